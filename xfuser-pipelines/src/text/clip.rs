//! The CLIP text encoders of the Stable Diffusion 3 pipelines (`text_encoder/`,
//! `text_encoder_2/`): transformers' `CLIPTextModelWithProjection`
//! (`models/clip/modeling_clip.py`), with the two outputs SD3 takes from it:
//! `hidden_states[-2]` (the output of the last-but-one layer, before the final layer norm) and
//! `text_embeds` (the final-layer-normed state at the eos position, projected). The same
//! type loads a `CLIPTextModel` folder (no `text_projection`, Flux's `text_encoder/`), whose
//! pooled output is `pooler_output`: that state unprojected
//! ([`ClipTextModelWithProjection::text_model_from_dir`]).
//!
//! Written here rather than taken from candle-transformers 0.11.1, whose two CLIP text models
//! do not fit:
//! - `models::clip::text_model` knows only the `quick_gelu` activation (SD3's CLIP-G,
//!   `text_encoder_2`, uses the exact erf `gelu`), keeps its embeddings private, hard-codes the
//!   layer-norm epsilon and pools only at `argmax(input_ids)`;
//! - `models::stable_diffusion::clip`'s `Config` has private fields (only its presets can be
//!   built, not a config read from `config.json`), its `Gelu` is the tanh approximation, its
//!   embeddings require the sequence to be exactly `max_position_embeddings` long and it has no
//!   projection or pooling.
//!
//! The layers themselves are candle-nn's (`Embedding`, `Linear`, `LayerNorm`, softmax). State
//! dict names as in transformers: `text_model.embeddings.{token,position}_embedding.weight`,
//! `text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}`,
//! `text_model.encoder.layers.N.layer_norm{1,2}.{weight,bias}`,
//! `text_model.encoder.layers.N.mlp.fc{1,2}.{weight,bias}`,
//! `text_model.final_layer_norm.{weight,bias}`, `text_projection.weight`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{
    embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder,
};
use xfuser_core::weights::WeightFiles;
use xfuser_core::{Error, Result};

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`): the keys the model reads, each
/// with `CLIPTextConfig`'s default. A full `CLIPConfig` is read through its `text_config`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// `"quick_gelu"` (CLIP-L), `"gelu"` (exact, CLIP-G), `"gelu_new"`/`"gelu_pytorch_tanh"`,
    /// `"relu"`, `"silu"`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// 2 selects the legacy pooling at `argmax(input_ids)`; any other value pools at the first
    /// occurrence of this id.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: i64,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_projection_dim() -> usize {
    512
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos_token_id() -> i64 {
    49407
}

/// transformers' `ACT2FN` entries a CLIP config can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x · sigmoid(1.702 x)`.
    QuickGelu,
    /// `0.5 x (1 + erf(x / √2))`.
    Gelu,
    /// The tanh approximation of gelu.
    GeluTanh,
    Relu,
    Silu,
}

impl Module for ClipActivation {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

impl ClipTextConfig {
    /// Reads `path` (a `config.json`, flat or with a `text_config`) and checks it.
    pub fn read(path: &Path) -> Result<Self> {
        let value = xfuser_core::config::read_json_value(path)?;
        let cfg: Self = match value.get("text_config") {
            Some(text) if text.is_object() => xfuser_core::config::json_value_config(text, path)?,
            _ => xfuser_core::config::json_value_config(&value, path)?,
        };
        cfg.activation(path)?;
        let bad = |field: &str, message: String| Error::Config {
            file: path.to_path_buf(),
            field: field.into(),
            message,
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ),
            ));
        }
        if cfg.num_hidden_layers == 0 {
            return Err(bad(
                "num_hidden_layers",
                "a CLIP text model needs at least one layer".into(),
            ));
        }
        Ok(cfg)
    }

    /// `hidden_act` as a [`ClipActivation`]; `path` is only named in errors.
    pub fn activation(&self, path: &Path) -> Result<ClipActivation> {
        Ok(match self.hidden_act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => ClipActivation::GeluTanh,
            "relu" => ClipActivation::Relu,
            "silu" | "swish" => ClipActivation::Silu,
            other => {
                return Err(Error::Config {
                    file: path.to_path_buf(),
                    field: "hidden_act".into(),
                    message: format!(
                        "{other:?} not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, \
                         gelu_fast, relu, silu)"
                    ),
                })
            }
        })
    }
}

/// Multi-head self-attention with biases, scaled by `1/√head_dim`; scores and softmax in f32.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// `xs`: (B, L, D); `mask`: (L, L) additive f32 (the causal mask).
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, d) = xs.dims3()?;
        let heads = |t: Tensor| {
            t.reshape((b, l, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)
        };
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights
            .matmul(&v)?
            .to_dtype(xs.dtype())?
            .transpose(1, 2)?
            .reshape((b, l, d))?;
        self.out_proj.forward(&out)
    }
}

/// `encoder.layers.N`: pre-norm attention and MLP, each with a residual.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(
        cfg: &ClipTextConfig,
        activation: ClipActivation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: layer_norm(d, eps, vb.pp("layer_norm1"))?,
            fc1: linear(d, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            activation,
            layer_norm2: layer_norm(d, eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        let mlp = self.fc2.forward(
            &self
                .activation
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?,
        )?;
        xs + mlp
    }
}

/// What SD3 takes from a CLIP text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `hidden_states[-2]`: the output of the last-but-one layer (`hidden_states[-(skip + 2)]`
    /// with a clip skip), without the final layer norm: (B, L, hidden_size).
    pub penultimate: Tensor,
    /// `text_embeds`: the final-layer-normed state at the eos position, through
    /// `text_projection`: (B, projection_dim). For a `CLIPTextModel` (no projection),
    /// `pooler_output`: that state itself, (B, hidden_size).
    pub pooled: Tensor,
}

/// transformers' `CLIPTextModelWithProjection`, without attention mask (SD3 passes none: only
/// the causal mask applies).
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    /// None for a `CLIPTextModel`: the pooled output is then `pooler_output`.
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModelWithProjection {
    /// Builds the model from a state dict in transformers' names (`cfg_path` is only named in
    /// errors about the configuration).
    pub fn new(cfg: &ClipTextConfig, cfg_path: &Path, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, cfg_path, vb, true)
    }

    /// transformers' `CLIPTextModel` from a state dict without `text_projection`: `pooled`
    /// is its `pooler_output`, (B, hidden_size).
    pub fn new_text_model(cfg: &ClipTextConfig, cfg_path: &Path, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, cfg_path, vb, false)
    }

    fn build(
        cfg: &ClipTextConfig,
        cfg_path: &Path,
        vb: VarBuilder,
        projection: bool,
    ) -> Result<Self> {
        let activation = cfg.activation(cfg_path)?;
        // transformers 4 saves a CLIPTextModel's weights under `text_model.` (as the Flux
        // repositories ship them), transformers 5 without that prefix: both load.
        let text =
            if projection || vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
                vb.pp("text_model")
            } else {
                vb.clone()
            };
        let embeddings = text.pp("embeddings");
        let d = cfg.hidden_size;
        let token_embedding = embedding(cfg.vocab_size, d, embeddings.pp("token_embedding"))?;
        let position_embedding = embedding(
            cfg.max_position_embeddings,
            d,
            embeddings.pp("position_embedding"),
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                ClipEncoderLayer::new(cfg, activation, text.pp("encoder.layers").pp(i.to_string()))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(d, cfg.layer_norm_eps, text.pp("final_layer_norm"))?;
        let text_projection = if projection {
            Some(linear_no_bias(
                d,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: cfg.clone(),
        })
    }

    /// A `text_encoder/` folder: `config.json` and `model.safetensors` (or its sharded index).
    /// Errors name the file: the config and its field, or the weights and the tensor.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_dir(dir, dtype, device, true)
    }

    /// A `CLIPTextModel` folder (Flux's `text_encoder/`): as [`from_dir`](Self::from_dir),
    /// without `text_projection`; `pooled` is `pooler_output`.
    pub fn text_model_from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_dir(dir, dtype, device, false)
    }

    fn load_dir(dir: &Path, dtype: DType, device: &Device, projection: bool) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = ClipTextConfig::read(&cfg_path)?;
        let weights = WeightFiles::find(dir, "model")?;
        let vb = weights.var_builder(dtype, device)?;
        Self::build(&cfg, &cfg_path, vb, projection).map_err(|e| match e {
            Error::Candle(e) => weights.error(e),
            other => other,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids`: (B, L) integer ids (u32 or i64), L ≤ `max_position_embeddings`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.forward_with_clip_skip(input_ids, 0)
    }

    /// As [`forward`](Self::forward), with `penultimate` taken `clip_skip` layers earlier:
    /// `hidden_states[-(clip_skip + 2)]`, as diffusers' SD3 `clip_skip`.
    pub fn forward_with_clip_skip(
        &self,
        input_ids: &Tensor,
        clip_skip: usize,
    ) -> Result<ClipTextOutput> {
        let (b, l) = input_ids.dims2()?;
        let n_layers = self.layers.len();
        if l == 0 || l > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "ClipTextModelWithProjection: {l} tokens, the model takes 1 to {}",
                self.config.max_position_embeddings
            )));
        }
        if clip_skip + 1 > n_layers {
            return Err(Error::invalid(format!(
                "ClipTextModelWithProjection: clip_skip {clip_skip} needs more than {n_layers} layers"
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, l as u32, device)?;
        let mut xs = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let causal: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(causal, (l, l), device)?;
        // hidden_states = (embeddings, layer 1, ..., layer N): keep entry N - 1 - clip_skip.
        let keep = n_layers - 1 - clip_skip;
        let mut penultimate = if keep == 0 { Some(xs.clone()) } else { None };
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &mask)?;
            if i + 1 == keep {
                penultimate = Some(xs.clone());
            }
        }
        let penultimate = penultimate.expect("keep < number of hidden states");
        let last = self.final_layer_norm.forward(&xs)?;
        let rows: Vec<u32> = self
            .eos_positions(&ids)?
            .into_iter()
            .enumerate()
            .map(|(row, pos)| (row * l + pos) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, device)?;
        let pooled = last
            .reshape((b * l, self.config.hidden_size))?
            .index_select(&rows, 0)?;
        let pooled = match &self.text_projection {
            Some(projection) => projection.forward(&pooled)?,
            None => pooled,
        };
        Ok(ClipTextOutput {
            penultimate,
            pooled,
        })
    }

    /// The pooled position of each row, as transformers: with the legacy `eos_token_id` 2, the
    /// (first) largest id; otherwise the first `eos_token_id`, or 0 if there is none.
    fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let eos = self.config.eos_token_id;
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        Ok(rows
            .iter()
            .map(|row| {
                if eos == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&id| id == max).unwrap_or(0)
                } else {
                    row.iter().position(|&id| id == eos).unwrap_or(0)
                }
            })
            .collect())
    }
}
