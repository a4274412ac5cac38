//! transformers' `ViTForImageClassification` (models/vit/modeling_vit.py), laid out for LiBai's
//! 3-D parallel ViT: every rank holds one pipeline stage's encoder layers (the patch embedding,
//! `[CLS]` token and position embedding on the first stage, the final layer norm and the
//! classifier on the last) and one tensor-parallel shard of each of them.
//!
//! Inside a layer, attention's `query`/`key`/`value` are column-parallel (each rank holds H/T
//! whole heads, so T must divide the heads) and its output `dense` row-parallel; the MLP's
//! `intermediate.dense` is column-parallel and `output.dense` row-parallel. Each row layer's
//! partial products are all-reduced over the tp group before the bias is added once: two
//! all-reduces of (B, S, D) per layer. Layer norms, embeddings and the classifier are
//! replicated. Weights are copied out of the memory-mapped checkpoint ([`SafetensorsShards`]):
//! a rank reads only its stage's tensors and, of the split layers, only its shard.
//! See docs/vit.md.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::{LayerNorm, Linear};
use serde::Deserialize;
use xfuser_core::attention::scaled_dot_product_attention;
use xfuser_core::backbone::stage_layer_ranges;
use xfuser_core::classifier::{check_degrees, ClassifierInfo, ImageClassifier};
use xfuser_core::config::{json_value_config, read_json_config};
use xfuser_core::distributed::ProcessGroup;
use xfuser_core::kernels;
use xfuser_core::registry::{ClassifierEntry, LoadOptions, ModelShape};
use xfuser_core::weights::WeightFiles;
use xfuser_core::{Error, Result};
use xfuser_layers::tensor_parallel::{
    ColumnParallelLinear, RowParallelLinear, SafetensorsShards, ShardSource, TpRank,
};

pub const CLASS_NAME: &str = "ViTForImageClassification";

/// A size given as one number (square) or as [height, width], as transformers accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(usize),
    HeightWidth([usize; 2]),
}

impl Size2 {
    /// (height, width)
    pub fn hw(self) -> (usize, usize) {
        match self {
            Size2::Square(s) => (s, s),
            Size2::HeightWidth([h, w]) => (h, w),
        }
    }
}

/// transformers' `ViTConfig`, with its defaults (google/vit-base-patch16-224's sizes). Fields
/// the classifier does not use (dropouts, the pooler, `encoder_stride`) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ViTConfig {
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::image_size")]
    pub image_size: Size2,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: Size2,
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    #[serde(default = "defaults::qkv_bias")]
    pub qkv_bias: bool,
    /// Label names by logit index ("0" → "tabby cat"); transformers names them LABEL_i when
    /// absent.
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Used only without `id2label` (transformers' default: 2).
    #[serde(default)]
    pub num_labels: Option<usize>,
}

mod defaults {
    use super::Size2;
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn hidden_act() -> String {
        "gelu".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn image_size() -> Size2 {
        Size2::Square(224)
    }
    pub fn patch_size() -> Size2 {
        Size2::Square(16)
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn qkv_bias() -> bool {
        true
    }
}

/// The MLP activations transformers' `ACT2FN` names that ViT checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// "gelu": the exact (erf) GELU.
    Gelu,
    /// "gelu_new", "gelu_pytorch_tanh": the tanh approximation.
    GeluTanh,
    Relu,
    /// "silu", "swish"
    Silu,
    /// "quick_gelu": x·σ(1.702·x).
    QuickGelu,
}

const ACTIVATIONS: &str = "gelu, gelu_new, gelu_pytorch_tanh, relu, silu, swish, quick_gelu";

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            "quick_gelu" => Self::QuickGelu,
            _ => return None,
        })
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

impl ViTConfig {
    /// Reads and checks `config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let config: Self = read_json_config(&file)?;
        config.check(&file)?;
        Ok(config)
    }

    fn field_error(file: &Path, field: &str, message: String) -> Error {
        Error::Config {
            file: file.to_path_buf(),
            field: field.into(),
            message,
        }
    }

    /// Refuses what the port cannot run, naming the field; `file` is for the errors.
    pub fn check(&self, file: &Path) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("num_channels", self.num_channels),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Self::field_error(file, field, "must be at least 1".into()));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Self::field_error(
                file,
                "hidden_size",
                format!(
                    "{} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if Activation::parse(&self.hidden_act).is_none() {
            return Err(Self::field_error(
                file,
                "hidden_act",
                format!(
                    "unsupported activation `{}`; supported: {ACTIVATIONS}",
                    self.hidden_act
                ),
            ));
        }
        let (h, w) = self.image_size.hw();
        let (ph, pw) = self.patch_size.hw();
        if ph == 0 || pw == 0 || h < ph || w < pw {
            return Err(Self::field_error(
                file,
                "patch_size",
                format!("{ph}x{pw} does not fit image_size {h}x{w}"),
            ));
        }
        self.labels(file)?;
        Ok(())
    }

    /// The label name of each logit: `id2label` (keys 0..n-1, all present), else LABEL_i.
    pub fn labels(&self, file: &Path) -> Result<Vec<String>> {
        let Some(map) = &self.id2label else {
            let n = self.num_labels.unwrap_or(2);
            return Ok((0..n).map(|i| format!("LABEL_{i}")).collect());
        };
        let mut labels = vec![None; map.len()];
        for (key, name) in map {
            let slot = key
                .parse::<usize>()
                .ok()
                .and_then(|i| labels.get_mut(i))
                .ok_or_else(|| {
                    Self::field_error(
                        file,
                        "id2label",
                        format!(
                            "key {key:?} is not a label index below {} (the keys must be 0 to \
                             {})",
                            map.len(),
                            map.len().saturating_sub(1)
                        ),
                    )
                })?;
            *slot = Some(name.clone());
        }
        let labels: Vec<String> = labels.into_iter().flatten().collect();
        if labels.is_empty() {
            return Err(Self::field_error(
                file,
                "id2label",
                "is empty; a classifier needs at least one label".into(),
            ));
        }
        Ok(labels)
    }

    fn activation(&self) -> Activation {
        // check() refused the others.
        Activation::parse(&self.hidden_act).unwrap_or(Activation::Gelu)
    }

    /// Patches of the model's input: (rows, columns).
    pub fn patch_grid(&self) -> (usize, usize) {
        let (h, w) = self.image_size.hw();
        let (ph, pw) = self.patch_size.hw();
        (h / ph, w / pw)
    }
}

/// The patch embedding (a stride-`patch` convolution, computed as one matrix product over the
/// flattened patches), the `[CLS]` token and the position embedding: the first stage's.
#[derive(Debug, Clone)]
struct Embeddings {
    /// (D, C·ph·pw), laid out for [`kernels::matmul_t`].
    patch_weight: Tensor,
    /// (D)
    patch_bias: Tensor,
    /// (1, 1, D)
    cls_token: Tensor,
    /// (1, 1 + N, D)
    position: Tensor,
}

/// The final layer norm and the classifier: the last stage's.
#[derive(Debug, Clone)]
struct Head {
    norm: LayerNorm,
    classifier: Linear,
}

/// One `ViTLayer`, its attention and MLP split over the tp group.
#[derive(Debug, Clone)]
struct Layer {
    norm_before: LayerNorm,
    query: ColumnParallelLinear,
    key: ColumnParallelLinear,
    value: ColumnParallelLinear,
    attn_out: RowParallelLinear,
    norm_after: LayerNorm,
    fc1: ColumnParallelLinear,
    fc2: RowParallelLinear,
    /// Heads this rank holds, H/T.
    local_heads: usize,
    head_dim: usize,
    activation: Activation,
}

/// The row layer's partial products summed over the tp group (nothing to sum at T = 1), then
/// its bias.
fn reduce_and_bias(
    row: &RowParallelLinear,
    input: &Tensor,
    tp: Option<&ProcessGroup>,
) -> Result<Tensor> {
    let partial = row.forward_partial(input)?;
    let summed = match tp {
        Some(group) if group.size() > 1 => group.all_reduce_sum(&partial)?,
        _ => partial,
    };
    Ok(match row.bias() {
        Some(b) => summed.broadcast_add(b)?,
        None => summed,
    })
}

impl Layer {
    fn forward(&self, x: &Tensor, tp: Option<&ProcessGroup>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let normed = self.norm_before.forward(x)?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, self.local_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(self.query.forward_local(&normed)?)?;
        let k = heads(self.key.forward_local(&normed)?)?;
        let v = heads(self.value.forward_local(&normed)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let attn = scaled_dot_product_attention(&q, &k, &v, None, scale)?;
        let merged = attn
            .transpose(1, 2)?
            .reshape((b, s, self.local_heads * self.head_dim))?;
        let x = (x + reduce_and_bias(&self.attn_out, &merged, tp)?)?;

        let normed = self.norm_after.forward(&x)?;
        let hidden = self.activation.apply(&self.fc1.forward_local(&normed)?)?;
        Ok((&x + reduce_and_bias(&self.fc2, &hidden, tp)?)?)
    }

    fn parameter_bytes(&self) -> usize {
        self.query.parameter_bytes()
            + self.key.parameter_bytes()
            + self.value.parameter_bytes()
            + self.attn_out.parameter_bytes()
            + self.fc1.parameter_bytes()
            + self.fc2.parameter_bytes()
    }
}

/// `ViTForImageClassification`, or one rank's part of it (see the module docs).
#[derive(Debug, Clone)]
pub struct ViTForImageClassification {
    config: ViTConfig,
    info: ClassifierInfo,
    embeddings: Option<Embeddings>,
    layers: Vec<Layer>,
    layer_range: Range<usize>,
    head: Option<Head>,
    tp: TpRank,
    bytes_read: u64,
}

fn layer_norm(source: &SafetensorsShards, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        source.load_full("weight", &[size])?,
        source.load_full("bias", &[size])?,
        eps,
    ))
}

impl ViTForImageClassification {
    /// Loads the part of the model in folder `dir` (`config.json`, `model.safetensors`) that
    /// `options` asks for: the layers of `options.stage` (all without one) and shard
    /// `options.tp` of their split layers.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let config = ViTConfig::from_dir(dir)?;
        let weights = WeightFiles::find(dir, "model")?;
        let files = SafetensorsShards::open(&weights.files, options.dtype, &options.device)?;
        let (num_stages, stage) = match &options.stage {
            Some(s) => (s.num_stages, s.index),
            None => (1, 0),
        };
        Self::from_shards(
            &config,
            &dir.join("config.json"),
            &files,
            num_stages,
            stage,
            options.tp,
        )
    }

    /// Builds stage `stage` of `num_stages` (an even split of the layers, the first stages one
    /// more), shard `tp`, from the checkpoint `files`; `file` (the config) is for errors.
    pub fn from_shards(
        config: &ViTConfig,
        file: &Path,
        files: &SafetensorsShards,
        num_stages: usize,
        stage: usize,
        tp: TpRank,
    ) -> Result<Self> {
        config.check(file)?;
        let shape = ModelShape {
            num_attention_heads: config.num_attention_heads,
            num_layers: config.num_hidden_layers,
        };
        check_degrees(&shape, tp.size, num_stages, file)?;
        let ranges = stage_layer_ranges(config.num_hidden_layers, num_stages, None)?;
        let layer_range = ranges.get(stage).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "pipeline stage {stage} of {num_stages}: no such stage"
            ))
        })?;
        let before = files.bytes_read();
        let vit = files.pp("vit");
        let embeddings = match stage == 0 {
            true => Some(load_embeddings(config, &vit.pp("embeddings"))?),
            false => None,
        };
        let layers = layer_range
            .clone()
            .map(|i| load_layer(config, &vit.pp("encoder.layer").pp(i), tp))
            .collect::<Result<Vec<_>>>()?;
        let head = match stage + 1 == num_stages {
            true => Some(load_head(config, files, file)?),
            false => None,
        };
        let c = config.num_channels;
        let (h, w) = config.image_size.hw();
        let info = ClassifierInfo {
            class_name: CLASS_NAME,
            num_layers: config.num_hidden_layers,
            num_attention_heads: config.num_attention_heads,
            input_size: (c, h, w),
            labels: config.labels(file)?,
        };
        Ok(Self {
            config: config.clone(),
            info,
            embeddings,
            layers,
            layer_range,
            head,
            tp,
            bytes_read: files.bytes_read() - before,
        })
    }

    pub fn config(&self) -> &ViTConfig {
        &self.config
    }

    /// The shard this instance holds.
    pub fn shard(&self) -> TpRank {
        self.tp
    }

    /// Bytes this instance copied out of the checkpoint when it was loaded: its stage's
    /// tensors, of the split layers only its shard.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Bytes of the split layers' buffers this instance keeps (1/T of the stage's, but for
    /// the row layers' biases, which every rank holds whole).
    pub fn split_parameter_bytes(&self) -> usize {
        self.layers.iter().map(Layer::parameter_bytes).sum()
    }

    fn stage_error(&self, what: &str) -> Error {
        Error::invalid(format!(
            "this pipeline stage of {CLASS_NAME} (layers {:?}) holds no {what}",
            self.layer_range
        ))
    }
}

fn load_embeddings(config: &ViTConfig, source: &SafetensorsShards) -> Result<Embeddings> {
    let d = config.hidden_size;
    let c = config.num_channels;
    let (ph, pw) = config.patch_size.hw();
    let (gh, gw) = config.patch_grid();
    let projection = source.pp("patch_embeddings.projection");
    let weight = projection.load_full("weight", &[d, c, ph, pw])?;
    Ok(Embeddings {
        patch_weight: kernels::gemm_friendly_weight(&weight.reshape((d, c * ph * pw))?)?,
        patch_bias: projection.load_full("bias", &[d])?,
        cls_token: source.load_full("cls_token", &[1, 1, d])?,
        position: source.load_full("position_embeddings", &[1, 1 + gh * gw, d])?,
    })
}

fn load_layer(config: &ViTConfig, source: &SafetensorsShards, tp: TpRank) -> Result<Layer> {
    let d = config.hidden_size;
    let eps = config.layer_norm_eps;
    let attention = source.pp("attention.attention");
    let column = |name: &str, out: usize, bias: bool| {
        ColumnParallelLinear::load(d, out, bias, tp, &source.pp(name))
    };
    Ok(Layer {
        norm_before: layer_norm(&source.pp("layernorm_before"), d, eps)?,
        query: ColumnParallelLinear::load(d, d, config.qkv_bias, tp, &attention.pp("query"))?,
        key: ColumnParallelLinear::load(d, d, config.qkv_bias, tp, &attention.pp("key"))?,
        value: ColumnParallelLinear::load(d, d, config.qkv_bias, tp, &attention.pp("value"))?,
        attn_out: RowParallelLinear::load(d, d, true, tp, &source.pp("attention.output.dense"))?,
        norm_after: layer_norm(&source.pp("layernorm_after"), d, eps)?,
        fc1: column("intermediate.dense", config.intermediate_size, true)?,
        fc2: RowParallelLinear::load(
            config.intermediate_size,
            d,
            true,
            tp,
            &source.pp("output.dense"),
        )?,
        local_heads: config.num_attention_heads / tp.size,
        head_dim: d / config.num_attention_heads,
        activation: config.activation(),
    })
}

fn load_head(config: &ViTConfig, files: &SafetensorsShards, file: &Path) -> Result<Head> {
    let d = config.hidden_size;
    let labels = config.labels(file)?.len();
    let classifier = files.pp("classifier");
    Ok(Head {
        norm: layer_norm(&files.pp("vit.layernorm"), d, config.layer_norm_eps)?,
        classifier: Linear::new(
            classifier.load_full("weight", &[labels, d])?,
            Some(classifier.load_full("bias", &[labels])?),
        ),
    })
}

impl ImageClassifier for ViTForImageClassification {
    fn info(&self) -> &ClassifierInfo {
        &self.info
    }

    fn held_layers(&self) -> Range<usize> {
        self.layer_range.clone()
    }

    fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let e = self
            .embeddings
            .as_ref()
            .ok_or_else(|| self.stage_error("patch embedding: only the first stage embeds"))?;
        let (b, c, h, w) = pixel_values.dims4()?;
        let (_, eh, ew) = self.info.input_size;
        if (c, h, w) != self.info.input_size {
            return Err(Error::invalid(format!(
                "{CLASS_NAME} takes pixel values of {c_} channels at {eh}x{ew}, got {c}x{h}x{w}",
                c_ = self.config.num_channels
            )));
        }
        // Patch (i, j) is the C·ph·pw pixels the stride-patch convolution reads, flattened in
        // the (C, ph, pw) order of its kernel.
        let (ph, pw) = self.config.patch_size.hw();
        let (gh, gw) = self.config.patch_grid();
        let patches = pixel_values
            .narrow(2, 0, gh * ph)?
            .narrow(3, 0, gw * pw)?
            .reshape((b, c, gh, ph, gw, pw))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * ph * pw))?;
        let tokens = kernels::matmul_t(&patches, &e.patch_weight)?.broadcast_add(&e.patch_bias)?;
        let d = self.config.hidden_size;
        let cls = e.cls_token.broadcast_as((b, 1, d))?;
        Ok(Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&e.position)?)
    }

    fn forward_layers(&self, hidden: &Tensor, tp: Option<&ProcessGroup>) -> Result<Tensor> {
        self.tp.check_group(tp, CLASS_NAME)?;
        let mut x = hidden.clone();
        for layer in &self.layers {
            x = layer.forward(&x, tp)?;
        }
        Ok(x)
    }

    fn classify(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| self.stage_error("classifier: only the last stage classifies"))?;
        // The layer norm is per token, so normalizing the [CLS] token alone is the same.
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let normed = head.norm.forward(&cls)?;
        Ok(head.classifier.forward(&normed)?.contiguous()?)
    }
}

fn load_classifier(dir: &Path, options: &LoadOptions) -> Result<Box<dyn ImageClassifier>> {
    Ok(Box::new(ViTForImageClassification::load(dir, options)?))
}

fn config_shape(value: &serde_json::Value, file: &Path) -> Result<ModelShape> {
    let config: ViTConfig = json_value_config(value, file)?;
    config.check(file)?;
    Ok(ModelShape {
        num_attention_heads: config.num_attention_heads,
        num_layers: config.num_hidden_layers,
    })
}

xfuser_core::inventory::submit! {
    ClassifierEntry {
        class_name: CLASS_NAME,
        load: load_classifier,
        shape: config_shape,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_vit_base() {
        let c: ViTConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (768, 12, 12)
        );
        assert_eq!(c.patch_grid(), (14, 14));
        assert_eq!(c.labels(Path::new("config.json")).unwrap().len(), 2);
    }

    #[test]
    fn an_unknown_activation_is_refused_by_name() {
        let c: ViTConfig = serde_json::from_str(r#"{"hidden_act": "mish"}"#).unwrap();
        let msg = c.check(Path::new("config.json")).unwrap_err().to_string();
        assert!(msg.contains("hidden_act") && msg.contains("mish"), "{msg}");
    }

    #[test]
    fn id2label_with_a_gap_is_refused() {
        let c: ViTConfig = serde_json::from_str(r#"{"id2label": {"0": "a", "2": "c"}}"#).unwrap();
        let msg = c.labels(Path::new("config.json")).unwrap_err().to_string();
        assert!(msg.contains("id2label") && msg.contains("\"2\""), "{msg}");
    }
}
