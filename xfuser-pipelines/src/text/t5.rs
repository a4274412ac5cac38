//! The T5 encoder of the PixArt pipelines (transformers' `T5EncoderModel`,
//! `models/t5/modeling_t5.py`), with the attention mask diffusers passes:
//! `text_encoder(input_ids, attention_mask=mask)`. Padded keys are masked out of every
//! self-attention; the outputs at padded positions are still computed (diffusers keeps them).
//!
//! Why not `candle_transformers::models::t5::T5EncoderModel`: its `forward(input_ids)` takes no
//! attention mask and its blocks, attention and position-bias computation are private, so a mask
//! cannot be injected — ignoring it changes every output of a padded prompt (PixArt pads to 120 or
//! 300 tokens). This module reads the same state dict (names as in transformers, no renaming):
//! `shared.weight`, `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight`,
//! `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`,
//! `encoder.block.N.layer.0.layer_norm.weight`,
//! `encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo | wi,wo}.weight`,
//! `encoder.block.N.layer.1.layer_norm.weight`, `encoder.final_layer_norm.weight`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Activation, Embedding, Linear, VarBuilder};
use xfuser_core::weights::WeightFiles;
use xfuser_core::{Error, Result};

/// `text_encoder/config.json` (transformers' `T5Config`): the keys the encoder reads, each with
/// `T5Config`'s default. Unknown keys (decoder settings, `dense_act_fn`, ...) are ignored; like
/// transformers, the activation is derived from `feed_forward_proj` alone.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct T5Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// `"relu"`, `"gated-gelu"` (T5 v1.1, PixArt's t5-v1_1-xxl), `"gated-{act}"` or `"{act}"`.
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
}

fn default_vocab_size() -> usize {
    32128
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    2048
}
fn default_num_layers() -> usize {
    6
}
fn default_num_heads() -> usize {
    8
}
fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_layer_norm_epsilon() -> f64 {
    1e-6
}
fn default_feed_forward_proj() -> String {
    "relu".into()
}

/// The feed-forward of a T5 layer, from `feed_forward_proj`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedForwardKind {
    pub gated: bool,
    pub activation: Activation,
}

impl T5Config {
    /// Reads `path` (a `config.json`) and checks what `T5Config.__post_init__` /
    /// `validate_architecture` check.
    pub fn read(path: &Path) -> Result<Self> {
        let cfg: Self = xfuser_core::config::read_json_config(path)?;
        cfg.feed_forward(path)?;
        if cfg.relative_attention_num_buckets < 4 {
            return Err(Error::Config {
                file: path.to_path_buf(),
                field: "relative_attention_num_buckets".into(),
                message: format!(
                    "{} is too small: T5's bucketing needs at least 4",
                    cfg.relative_attention_num_buckets
                ),
            });
        }
        Ok(cfg)
    }

    /// `feed_forward_proj` split as transformers does: `gated-gelu` is the tanh-approximated
    /// `gelu_new`, any other name is `ACT2FN[name]`. `path` is only named in errors.
    pub fn feed_forward(&self, path: &Path) -> Result<FeedForwardKind> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, name) = match proj.split_once('-') {
            Some(("gated", act)) if !act.contains('-') => (true, act),
            None => (false, proj),
            _ => return Err(self.unsupported_proj(path, "expected `gated-{act}` or `{act}`")),
        };
        let name = if proj == "gated-gelu" {
            "gelu_new"
        } else {
            name
        };
        let activation = match name {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::NewGelu,
            "silu" | "swish" => Activation::Silu,
            _ => {
                return Err(self.unsupported_proj(
                    path,
                    "activation not supported (relu, gelu, gelu_new, gelu_pytorch_tanh, silu)",
                ))
            }
        };
        Ok(FeedForwardKind { gated, activation })
    }

    fn unsupported_proj(&self, path: &Path, why: &str) -> Error {
        Error::Config {
            file: path.to_path_buf(),
            field: "feed_forward_proj".into(),
            message: format!("{:?}: {why}", self.feed_forward_proj),
        }
    }
}

/// The bucket of a relative position (`key − query`) in a bidirectional (encoder) T5
/// attention: transformers' `T5Attention._relative_position_bucket(..., bidirectional=True)`.
/// The logarithmic part is computed in float32 as torch does, so that positions on a bucket
/// boundary land in the same bucket.
pub fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let num_buckets = num_buckets / 2;
    let offset = if relative_position > 0 {
        num_buckets
    } else {
        0
    };
    let distance = relative_position.unsigned_abs() as usize;
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        return offset + distance;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln();
    // `math.log(max_distance / max_exact)` is a Python float: float64, then rounded once to
    // float32 when it divides the float32 tensor.
    let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio / log_range * (num_buckets - max_exact) as f32) as usize;
    offset + large.min(num_buckets - 1)
}

/// RMS norm without bias or mean subtraction, statistics in float32.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(cfg: &T5Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(cfg.d_model, "weight")?,
            eps: cfg.layer_norm_epsilon,
        })
    }
}

impl Module for T5LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs32 = xs.to_dtype(DType::F32)?;
        let variance = xs32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xs32.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        normed
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

#[derive(Debug, Clone)]
enum DenseReluDense {
    /// `wi` → act → `wo` (original T5).
    Plain {
        wi: Linear,
        wo: Linear,
        act: Activation,
    },
    /// act(`wi_0`) · `wi_1` → `wo` (T5 v1.1).
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
        act: Activation,
    },
}

impl DenseReluDense {
    fn new(cfg: &T5Config, kind: FeedForwardKind, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        // In f16 the output projection stays in f32, as transformers keeps T5's `wo` (its
        // `_keep_in_fp32_modules`): its products overflow f16 in T5 v1.1 XXL.
        let wo_vb = match vb.dtype() {
            DType::F16 => vb.pp("wo").set_dtype(DType::F32),
            _ => vb.pp("wo"),
        };
        Ok(if kind.gated {
            Self::Gated {
                wi_0: linear_no_bias(d, ff, vb.pp("wi_0"))?,
                wi_1: linear_no_bias(d, ff, vb.pp("wi_1"))?,
                wo: linear_no_bias(ff, d, wo_vb)?,
                act: kind.activation,
            }
        } else {
            Self::Plain {
                wi: linear_no_bias(d, ff, vb.pp("wi"))?,
                wo: linear_no_bias(ff, d, wo_vb)?,
                act: kind.activation,
            }
        })
    }
}

/// `wo` on `xs`, cast to `wo`'s dtype first (f32 in an f16 model, see [`DenseReluDense::new`]).
fn project_out(wo: &Linear, xs: &Tensor) -> candle_core::Result<Tensor> {
    wo.forward(&xs.to_dtype(wo.weight().dtype())?)
}

impl Module for DenseReluDense {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Plain { wi, wo, act } => project_out(wo, &act.forward(&wi.forward(xs)?)?),
            Self::Gated {
                wi_0,
                wi_1,
                wo,
                act,
            } => {
                let gate = act.forward(&wi_0.forward(xs)?)?;
                project_out(wo, &(gate * wi_1.forward(xs)?)?)
            }
        }
    }
}

/// `layer.1`: pre-norm feed-forward with residual.
#[derive(Debug, Clone)]
struct T5LayerFF {
    dense_relu_dense: DenseReluDense,
    layer_norm: T5LayerNorm,
}

impl T5LayerFF {
    fn new(cfg: &T5Config, kind: FeedForwardKind, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            dense_relu_dense: DenseReluDense::new(cfg, kind, vb.pp("DenseReluDense"))?,
            layer_norm: T5LayerNorm::new(cfg, vb.pp("layer_norm"))?,
        })
    }
}

impl Module for T5LayerFF {
    /// The residual sum in the wider of the two dtypes, as torch promotes it: in an f16 model
    /// the f32 `wo` output makes the residual stream f32 from the first block on.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let ff = self
            .dense_relu_dense
            .forward(&self.layer_norm.forward(xs)?)?;
        let dtype = wider(xs.dtype(), ff.dtype());
        xs.to_dtype(dtype)? + ff.to_dtype(dtype)?
    }
}

/// The dtype torch promotes a sum of `a` and `b` to, for the float dtypes a T5 runs in.
fn wider(a: DType, b: DType) -> DType {
    if a == DType::F32 || b == DType::F32 {
        DType::F32
    } else {
        a
    }
}

/// Unscaled multi-head self-attention; the relative position bias and the key mask come in as
/// one additive bias.
#[derive(Debug, Clone)]
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    d_kv: usize,
}

impl T5Attention {
    fn new(cfg: &T5Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `xs`: (B, L, d_model); `bias`: (B or 1, H, L, L).
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        // (B, L, H·Dk) -> (B, H, L, Dk)
        let heads = |t: Tensor| {
            t.reshape((b, l, self.num_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q.forward(xs)?)?;
        let k = heads(self.k.forward(xs)?)?;
        let v = heads(self.v.forward(xs)?)?;
        // T5 folds the scale into its initialisation: no 1/sqrt(d_kv) here.
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        // The softmax in f32 whatever the model's dtype, back to it for the product with v
        // (as transformers' T5Attention does).
        let weights = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(xs.dtype())?;
        // (B, H, L, Dk) -> (B, L, H·Dk)
        let out =
            weights
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, l, self.num_heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

/// `encoder.block.N`: `layer.0` self-attention, `layer.1` feed-forward, both pre-norm.
#[derive(Debug, Clone)]
struct T5Block {
    self_attention: T5Attention,
    attention_norm: T5LayerNorm,
    ff: T5LayerFF,
}

impl T5Block {
    fn new(cfg: &T5Config, kind: FeedForwardKind, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("layer");
        Ok(Self {
            self_attention: T5Attention::new(cfg, vb.pp("0").pp("SelfAttention"))?,
            attention_norm: T5LayerNorm::new(cfg, vb.pp("0").pp("layer_norm"))?,
            ff: T5LayerFF::new(cfg, kind, vb.pp("1"))?,
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let attn = self
            .self_attention
            .forward(&self.attention_norm.forward(xs)?, bias)?;
        let dtype = wider(xs.dtype(), attn.dtype());
        let xs = clamp_f16(&(xs.to_dtype(dtype)? + attn.to_dtype(dtype)?)?)?;
        clamp_f16(&self.ff.forward(&xs)?)
    }
}

/// transformers clamps float16 hidden states after each sub-layer so that an overflow does not
/// turn into NaN in the next norm; other dtypes pass through.
fn clamp_f16(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() != DType::F16 {
        return Ok(xs.clone());
    }
    let max = 65504.0; // float16 max
    let has_inf = xs
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_infinite();
    let bound = if has_inf { max - 1000.0 } else { max };
    xs.clamp(-bound, bound)
}

/// The most negative finite value of `dtype` (`torch.finfo(dtype).min`), the value masked
/// scores are set to.
fn finite_min(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.389_531_389_251_535_5e38,
        DType::F64 => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// transformers' `T5EncoderModel`.
#[derive(Debug, Clone)]
pub struct T5EncoderModel {
    shared: Embedding,
    relative_attention_bias: Embedding,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
    config: T5Config,
    dtype: DType,
}

impl T5EncoderModel {
    /// Builds the encoder from a state dict in transformers' names (`cfg_path` is only named in
    /// errors about the configuration).
    pub fn new(cfg: &T5Config, cfg_path: &Path, vb: VarBuilder) -> Result<Self> {
        let kind = cfg.feed_forward(cfg_path)?;
        let shared_name = if vb.contains_tensor("shared.weight") {
            "shared"
        } else {
            // Checkpoints that kept only the encoder's (tied) copy.
            "encoder.embed_tokens"
        };
        let shared = embedding(cfg.vocab_size, cfg.d_model, vb.pp(shared_name))?;
        let encoder = vb.pp("encoder");
        let relative_attention_bias = embedding(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            encoder.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| T5Block::new(cfg, kind, encoder.pp("block").pp(i.to_string())))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = T5LayerNorm::new(cfg, encoder.pp("final_layer_norm"))?;
        Ok(Self {
            shared,
            relative_attention_bias,
            blocks,
            final_layer_norm,
            config: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// A `text_encoder/` folder: `config.json` and `model.safetensors` (or its sharded index).
    /// Errors name the file: the config and its field, or the weights and the tensor.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path: PathBuf = dir.join("config.json");
        let cfg = T5Config::read(&cfg_path)?;
        let weights = WeightFiles::find(dir, "model")?;
        let vb = weights.var_builder(dtype, device)?;
        Self::new(&cfg, &cfg_path, vb).map_err(|e| match e {
            Error::Candle(e) => weights.error(e),
            other => other,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// The relative position bias shared by all layers: (1, H, L, L).
    fn position_bias(&self, len: usize, device: &Device) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let buckets: Vec<u32> = (0..len as i64)
            .flat_map(|query| {
                (0..len as i64).map(move |key| {
                    relative_position_bucket(
                        key - query,
                        cfg.relative_attention_num_buckets,
                        cfg.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (len, len), device)?;
        // (L, L, H) -> (1, H, L, L)
        self.relative_attention_bias
            .forward(&buckets)?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// `input_ids`: (B, L) integer ids; `attention_mask`: (B, L), nonzero on tokens, zero on
    /// padding (any dtype), or `None` to attend everywhere. Returns `last_hidden_state`,
    /// (B, L, d_model), in the model's dtype.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let device = input_ids.device();
        let position_bias = self.position_bias(l, device)?.to_dtype(self.dtype)?;
        // As transformers' sdpa path: masked keys get finfo.min in place of the position bias.
        let bias = match attention_mask {
            None => position_bias,
            Some(mask) => {
                if mask.dims() != [b, l] {
                    return Err(Error::invalid(format!(
                        "T5EncoderModel: attention_mask has shape {:?}, input_ids {:?}",
                        mask.dims(),
                        input_ids.dims()
                    )));
                }
                let h = self.config.num_heads;
                let keep = mask
                    .to_dtype(DType::F32)?
                    .ne(0f32)?
                    .reshape((b, 1, 1, l))?
                    .broadcast_as((b, h, l, l))?;
                let masked = (Tensor::ones((), self.dtype, device)? * finite_min(self.dtype))?
                    .broadcast_as((b, h, l, l))?;
                keep.where_cond(&position_bias.broadcast_as((b, h, l, l))?, &masked)?
            }
        };
        let mut xs = self.shared.forward(input_ids)?;
        for block in &self.blocks {
            xs = block.forward(&xs, &bias)?;
        }
        Ok(self.final_layer_norm.forward(&xs)?)
    }
}
