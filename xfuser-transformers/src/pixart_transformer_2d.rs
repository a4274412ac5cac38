//! PixArt-α / PixArt-Σ diffusion transformer, a port of diffusers'
//! `models/transformers/pixart_transformer_2d.py` (`PixArtTransformer2DModel`, with
//! `BasicTransformerBlock` in its `ada_norm_single` form).
//!
//! Papers: PixArt-α <https://arxiv.org/abs/2310.00426>, PixArt-Σ <https://arxiv.org/abs/2403.04692>.
//!
//! The forward is split as the [`Backbone`] contract asks: `embed` (patch embedding, adaLN-single
//! conditioning, caption projection, text mask bias), `blocks` and `head` (final modulated norm,
//! projection, unpatchify). Module and tensor names are diffusers' state-dict names, so a
//! diffusers folder loads without renaming.
//!
//! Sequence parallelism (a [`ForwardContext`] with `sp`): every sp rank takes the whole latent,
//! `embed` patch-embeds only its own token rows (with their rows of the global positional
//! embedding) padded to the split's common length, self-attention goes through the context's
//! parallel processor, cross-attention needs nothing (the text is replicated), and `head`
//! projects the local tokens, all-gathers them over the sp group, drops the padding and
//! unpatchifies, so every sp rank returns the whole output.
//!
//! PipeFusion stages ([`LoadOptions::stage`]): a stage loads only its blocks, the patch
//! embedding on the first stage and the final layer on the last; every stage loads the small
//! conditioning modules (adaLN-single, caption projection), so that the conditioning never
//! travels between stages ([`Backbone::embed_conditioning`]).

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Module, Tensor, TensorId};
use candle_nn::{Linear, VarBuilder};
use xfuser_core::attention::{AttentionProcessor, SerialAttention};
use xfuser_core::backbone::{
    names, Backbone, BackboneInfo, BackboneInputs, BlockState, Conditioning, ForwardContext,
    PipelineStage,
};
use xfuser_core::distributed::{ProcessGroup, TpRank};
use xfuser_core::kernels;
use xfuser_core::registry::{ClassAlias, Kind, LoadOptions, ModelShape, TransformerEntry};
use xfuser_core::{Error, Result};
use xfuser_layers::embeddings::{PatchEmbed, PixArtAlphaTextProjection};
use xfuser_layers::feed_forward::{FeedForwardActivation, ParallelFeedForward};
use xfuser_layers::normalization::{AdaLayerNormSingle, LayerNorm};
use xfuser_layers::tensor_parallel::{ColumnParallelLinear, RowParallelLinear, SplitWeights};

pub use crate::backbone_common::ConfigProblem;
use crate::backbone_common::{self as common, ModelConfig, StageLayers};

pub const CLASS_NAME: &str = "PixArtTransformer2DModel";

/// PixArt-α's micro-conditioning inputs (sample_size 128 models): (B, 2) [height, width] and
/// (B, 1) height / width.
pub const RESOLUTION: &str = "resolution";
pub const ASPECT_RATIO: &str = "aspect_ratio";

/// The block state's model-own tensors: adaLN-single's (B, 6·D) block modulation and its
/// (B, D) embedded timestep, which the head reads.
const BLOCK_MODULATION: &str = "adaln_block_modulation";
const HEAD_CONDITIONING: &str = "adaln_embedded_timestep";

/// `config.json` of a PixArt transformer, field for field with diffusers' defaults. Keys that
/// only the old `Transformer2DModel` class reads (`use_linear_projection`, ...) are ignored, as
/// diffusers ignores them when it remaps that class to this one.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Config {
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Absent: 8; null: `in_channels`.
    #[serde(default = "default_out_channels")]
    pub out_channels: Option<usize>,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    /// Training only.
    #[serde(default)]
    pub dropout: f64,
    /// Unused by PixArt (kept because diffusers' configs carry it).
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_activation_fn")]
    pub activation_fn: String,
    #[serde(default = "default_num_embeds_ada_norm")]
    pub num_embeds_ada_norm: Option<usize>,
    /// The attention softmax is always computed in f32 here, so this changes nothing.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// null: max(sample_size / 64, 1).
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    /// null: sample_size == 128 (PixArt-α 1024px used resolution/aspect-ratio conditioning).
    #[serde(default)]
    pub use_additional_conditions: Option<bool>,
    #[serde(default)]
    pub caption_channels: Option<usize>,
    #[serde(default = "default_attention_type")]
    pub attention_type: Option<String>,
}

fn default_num_attention_heads() -> usize {
    16
}
fn default_attention_head_dim() -> usize {
    72
}
fn default_in_channels() -> usize {
    4
}
fn default_out_channels() -> Option<usize> {
    Some(8)
}
fn default_num_layers() -> usize {
    28
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_cross_attention_dim() -> Option<usize> {
    Some(1152)
}
fn default_true() -> bool {
    true
}
fn default_sample_size() -> usize {
    128
}
fn default_patch_size() -> usize {
    2
}
fn default_activation_fn() -> String {
    "gelu-approximate".into()
}
fn default_num_embeds_ada_norm() -> Option<usize> {
    Some(1000)
}
fn default_norm_type() -> String {
    "ada_norm_single".into()
}
fn default_norm_eps() -> f64 {
    1e-6
}
fn default_attention_type() -> Option<String> {
    Some("default".into())
}

impl Config {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn use_additional_conditions(&self) -> bool {
        self.use_additional_conditions
            .unwrap_or(self.sample_size == 128)
    }

    pub fn interpolation_scale(&self) -> f64 {
        self.interpolation_scale
            .unwrap_or_else(|| (self.sample_size / 64).max(1) as f64)
    }

    /// Checks that the model described can be built and run; names the first bad field.
    pub fn validate(&self) -> std::result::Result<(), ConfigProblem> {
        let problem = |field, message: String| Err(ConfigProblem { field, message });
        if self.norm_type != "ada_norm_single" {
            return problem(
                "norm_type",
                format!(
                    "`{}` is not supported by PixArtTransformer2DModel; only `ada_norm_single`",
                    self.norm_type
                ),
            );
        }
        if self.num_embeds_ada_norm.is_none() {
            return problem(
                "num_embeds_ada_norm",
                "null is not allowed with norm_type `ada_norm_single`".into(),
            );
        }
        if FeedForwardActivation::from_diffusers_name(&self.activation_fn).is_none() {
            return problem(
                "activation_fn",
                format!(
                    "`{}` is not supported; supported: {}",
                    self.activation_fn,
                    FeedForwardActivation::SUPPORTED.join(", ")
                ),
            );
        }
        if let Some(kind) = self.attention_type.as_deref().filter(|k| *k != "default") {
            return problem(
                "attention_type",
                format!("`{kind}` is not supported; only `default`"),
            );
        }
        common::check_attention_heads(self.num_attention_heads, self.attention_head_dim)?;
        let inner = self.inner_dim();
        common::check_sincos_width(inner)?;
        if self.use_additional_conditions() && !inner.is_multiple_of(3) {
            return problem(
                "use_additional_conditions",
                format!(
                    "true needs a hidden size divisible by 3 (resolution and aspect-ratio \
                     embeddings), got {inner}"
                ),
            );
        }
        common::check_patch_size(self.patch_size, self.sample_size)?;
        common::check_channels(self.in_channels, self.out_channels())?;
        if self.caption_channels.is_some() {
            if let Some(dim) = self.cross_attention_dim.filter(|d| *d != inner) {
                return problem(
                    "cross_attention_dim",
                    format!(
                        "{dim} differs from the hidden size {inner} that the caption projection \
                         produces"
                    ),
                );
            }
        }
        Ok(())
    }
}

impl ModelConfig for Config {
    fn check(&self) -> std::result::Result<(), ConfigProblem> {
        self.validate()
    }

    fn shape(&self) -> ModelShape {
        ModelShape {
            num_attention_heads: self.num_attention_heads,
            num_layers: self.num_layers,
        }
    }
}

/// Multi-head attention with diffusers' `Attention` weights (`to_q`, `to_k`, `to_v`,
/// `to_out.0`). The projections that read the same input run as one matrix product (q, k
/// and v for self-attention; k and v for cross-attention), and the head split and the biases
/// are one pass ([`kernels::split_heads`]).
///
/// Split over a tensor-parallel group of T: `to_q/to_k/to_v` are column-parallel (this rank's
/// H/T whole heads), `to_out.0` row-parallel; the outputs are this rank's partial products,
/// which the block all-reduces. With T = 1 they are the whole outputs.
#[derive(Debug)]
struct Attention {
    /// Self-attention: [to_q; to_k; to_v] (3·inner/T, D); cross-attention: to_q (inner/T, D).
    w_in: Tensor,
    b_in: Option<Tensor>,
    /// Cross-attention: [to_k; to_v] (2·inner/T, kv_dim) and their biases.
    kv: Option<(Tensor, Option<Tensor>)>,
    to_out: RowParallelLinear,
    /// This rank's heads, H/T.
    heads: usize,
    head_dim: usize,
    /// Cross-attention: the text keys and values of the last encoder tensors seen, by tensor
    /// id. The text is the same tensor at every step of a denoising loop, so they are
    /// computed once per loop (candle tensors are immutable: an id names one content).
    kv_cache: Mutex<Vec<(TensorId, Tensor, Tensor)>>,
    /// Bytes of the weights this rank keeps.
    parameter_bytes: usize,
}

/// Encoder tensors whose text keys/values a cross-attention keeps (e.g. both CFG halves of
/// two rank threads sharing a model).
const KV_CACHE_ENTRIES: usize = 2;

impl Attention {
    /// Shard `tp` of the attention at `weights` (`heads` must divide by `tp.size`, checked
    /// by the model).
    #[allow(clippy::too_many_arguments)]
    fn new(
        query_dim: usize,
        kv_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
        cross: bool,
        tp: TpRank,
        weights: &SplitWeights,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let proj =
            |in_dim, name| ColumnParallelLinear::load(in_dim, inner, bias, tp, &weights.pp(name));
        let (to_q, to_k, to_v) = (
            proj(query_dim, "to_q")?,
            proj(kv_dim, "to_k")?,
            proj(kv_dim, "to_v")?,
        );
        let to_out = RowParallelLinear::load(inner, query_dim, true, tp, &weights.pp("to_out.0"))?;
        let parameter_bytes = [&to_q, &to_k, &to_v]
            .iter()
            .map(|l| l.parameter_bytes())
            .sum::<usize>()
            + to_out.parameter_bytes();
        let ((w_in, b_in), kv) = if cross {
            (
                common::fuse_columns(&[&to_q])?,
                Some(common::fuse_columns(&[&to_k, &to_v])?),
            )
        } else {
            (common::fuse_columns(&[&to_q, &to_k, &to_v])?, None)
        };
        Ok(Self {
            w_in,
            b_in,
            kv,
            to_out,
            heads: heads / tp.size,
            head_dim,
            kv_cache: Mutex::new(Vec::new()),
            parameter_bytes,
        })
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// (B, S, Din) -> `parts` tensors (B, H, S, Dh), contiguous, through `w` and `b`.
    fn project_heads(
        &self,
        xs: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        parts: usize,
    ) -> candle_core::Result<Vec<Tensor>> {
        kernels::split_heads(&kernels::matmul_t(xs, w)?, b, parts, self.heads)
    }

    /// (B, H/T, S, Dh) -> (B, S, H/T·Dh) -> to_out's partial matrix product, not reduced,
    /// its bias not yet added.
    fn merge_heads_and_project(&self, xs: Tensor) -> Result<Tensor> {
        let (b, _, s, _) = xs.dims4()?;
        let merged =
            xs.transpose(1, 2)?
                .contiguous()?
                .reshape((b, s, self.heads * self.head_dim))?;
        self.to_out.forward_partial(&merged)
    }

    fn out_bias(&self) -> Option<&Tensor> {
        self.to_out.bias()
    }

    /// Self-attention over the image tokens, through the runtime's processor; returns this
    /// rank's partial output (the whole one when T = 1) without to_out's bias
    /// ([`Self::out_bias`]).
    fn self_attention(
        &self,
        xs: &Tensor,
        layer: usize,
        processor: &dyn AttentionProcessor,
    ) -> Result<Tensor> {
        let qkv = self.project_heads(xs, &self.w_in, self.b_in.as_ref(), 3)?;
        if processor.name() == SerialAttention.name() {
            // The serial processor's math, fused, with the heads merged on the way.
            let out = kernels::attention_merged(&qkv[0], &qkv[1], &qkv[2], None, self.scale())?;
            return self.to_out.forward_partial(&out);
        }
        let out = processor.self_attention(layer, &qkv[0], &qkv[1], &qkv[2], self.scale())?;
        self.merge_heads_and_project(out)
    }

    /// The text keys and values (B, H/T, L, Dh), from the cache when `encoder` was seen.
    fn text_kv(&self, encoder: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let id = encoder.id();
        let mut cache = self.kv_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, k, v)) = cache.iter().find(|(i, _, _)| *i == id) {
            return Ok((k.clone(), v.clone()));
        }
        let (w, b) = self.kv.as_ref().expect("cross-attention has k/v weights");
        let mut kv = self.project_heads(encoder, w, b.as_ref(), 2)?;
        let v = kv.pop().expect("two parts");
        let k = kv.pop().expect("two parts");
        if cache.len() == KV_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((id, k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Cross-attention from the image tokens to the text tokens (this rank's heads); `bias`
    /// masks text padding. Returns this rank's partial output without to_out's bias
    /// ([`Self::out_bias`]).
    fn cross_attention(
        &self,
        xs: &Tensor,
        encoder: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = self
            .project_heads(xs, &self.w_in, self.b_in.as_ref(), 1)?
            .pop()
            .expect("one part");
        let (k, v) = self.text_kv(encoder)?;
        let out = kernels::attention_merged(&q, &k, &v, bias, self.scale())?;
        self.to_out.forward_partial(&out)
    }
}

/// diffusers' `BasicTransformerBlock` with `norm_type="ada_norm_single"`: modulated
/// self-attention, un-normalized cross-attention to the text, modulated feed-forward.
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Option<Attention>,
    ff: ParallelFeedForward,
    /// (6, D): per-block offsets of shift/scale/gate for attention and feed-forward.
    scale_shift_table: Tensor,
    dim: usize,
}

impl BasicTransformerBlock {
    /// Shard `tp` of the block: attention and feed-forward split (from `weights`), the
    /// norms and the modulation table whole (from `vb`).
    fn new(
        cfg: &Config,
        activation: FeedForwardActivation,
        tp: TpRank,
        vb: VarBuilder,
        weights: &SplitWeights,
    ) -> Result<Self> {
        let dim = cfg.inner_dim();
        let (heads, head_dim) = (cfg.num_attention_heads, cfg.attention_head_dim);
        let norm =
            |name| LayerNorm::new(dim, cfg.norm_eps, cfg.norm_elementwise_affine, vb.pp(name));
        let attn2 = match cfg.cross_attention_dim {
            Some(kv_dim) => Some(Attention::new(
                dim,
                kv_dim,
                heads,
                head_dim,
                cfg.attention_bias,
                true,
                tp,
                &weights.pp("attn2"),
            )?),
            None => None,
        };
        Ok(Self {
            norm1: norm("norm1")?,
            attn1: Attention::new(
                dim,
                dim,
                heads,
                head_dim,
                cfg.attention_bias,
                false,
                tp,
                &weights.pp("attn1"),
            )?,
            norm2: norm("norm2")?,
            attn2,
            ff: ParallelFeedForward::load(dim, 4 * dim, activation, tp, &weights.pp("ff"))?,
            scale_shift_table: vb.get((6, dim), "scale_shift_table")?,
            dim,
        })
    }

    /// The six (B, 1, D) modulations of the block: shift, scale, gate of the attention and of
    /// the feed-forward.
    fn modulation(&self, state: &BlockState, batch: usize) -> Result<Vec<Tensor>> {
        // (B, 6·D) -> (B, 6, D) + (6, D) -> six (B, 1, D)
        let modulation = state
            .conditioning(BLOCK_MODULATION)?
            .reshape((batch, 6, self.dim))?
            .broadcast_add(&self.scale_shift_table)?;
        Ok((0..6)
            .map(|i| modulation.narrow(1, i, 1)?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?)
    }

    /// `norm1` of `hidden` with the block's attention shift and scale: the attention's input.
    fn modulated_input(&self, hidden: &Tensor, state: &BlockState) -> Result<Tensor> {
        let m = self.modulation(state, hidden.dim(0)?)?;
        Ok(self.norm1.forward_modulated(hidden, &m[0], &m[1])?)
    }

    /// Bytes of the split layers' weights this rank keeps.
    fn split_parameter_bytes(&self) -> usize {
        self.attn1.parameter_bytes
            + self.attn2.as_ref().map_or(0, |a| a.parameter_bytes)
            + self.ff.parameter_bytes()
    }

    /// hidden (B, N, D) -> (B, N, D); `state` supplies the text and the conditioning; `tp`
    /// the group the split layers' partial outputs are all-reduced over (None: whole layers).
    fn forward(
        &self,
        hidden: &Tensor,
        state: &BlockState,
        layer: usize,
        processor: &dyn AttentionProcessor,
        tp: Option<&ProcessGroup>,
    ) -> Result<Tensor> {
        let m = self.modulation(state, hidden.dim(0)?)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);

        let normed = self.norm1.forward_modulated(hidden, shift_msa, scale_msa)?;
        let attn =
            common::tp_all_reduce(self.attn1.self_attention(&normed, layer, processor)?, tp)?;
        let mut hidden =
            kernels::gated_residual(hidden, Some(gate_msa), &attn, self.attn1.out_bias())?;

        if let Some(attn2) = &self.attn2 {
            let text = state.text(CLASS_NAME)?;
            let attn = common::tp_all_reduce(
                attn2.cross_attention(&hidden, text, state.encoder_bias.as_ref())?,
                tp,
            )?;
            hidden = kernels::gated_residual(&hidden, None, &attn, attn2.out_bias())?;
        }

        let normed = self
            .norm2
            .forward_modulated(&hidden, shift_mlp, scale_mlp)?;
        let ff = common::tp_all_reduce(self.ff.forward_partial(&normed)?, tp)?;
        Ok(kernels::gated_residual(
            &hidden,
            Some(gate_mlp),
            &ff,
            self.ff.out_bias(),
        )?)
    }
}

/// x·(1 + scale) + shift, with (B, 1, D) scale and shift.
fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    xs.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// diffusers' `PixArtTransformer2DModel`, or one PipeFusion stage of it.
#[derive(Debug)]
pub struct PixArtTransformer2DModel {
    info: BackboneInfo,
    config: Config,
    /// None on PipeFusion stages after the first.
    pos_embed: Option<PatchEmbed>,
    adaln_single: AdaLayerNormSingle,
    caption_projection: Option<PixArtAlphaTextProjection>,
    /// The blocks `layers` (all of them unless this is a PipeFusion stage).
    transformer_blocks: Vec<BasicTransformerBlock>,
    layers: Range<usize>,
    norm_out: LayerNorm,
    /// (2, D): shift and scale offsets of the final norm, and the projection; None on
    /// PipeFusion stages before the last.
    final_layer: Option<(Tensor, Linear)>,
    /// Bytes of the weights loaded, when loaded from files.
    parameter_bytes: Option<u64>,
    dtype: DType,
    /// The tensor-parallel shard this instance holds (the whole model: serial).
    tp: TpRank,
}

impl PixArtTransformer2DModel {
    /// Builds the model from `vb` (the weights' root, names as in diffusers' state dict).
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::new_stage(cfg, vb, None)
    }

    /// Builds the whole model (`stage` None) or one PipeFusion stage of it, fetching only
    /// the weights that stage holds.
    pub fn new_stage(
        cfg: &Config,
        vb: VarBuilder,
        stage: Option<&PipelineStage>,
    ) -> candle_core::Result<Self> {
        common::serial_shard(cfg, vb, stage, Self::new_shard)
    }

    /// Builds tensor-parallel shard `tp` of the whole model or of a PipeFusion stage: the
    /// attention (`to_q/to_k/to_v` column-parallel, `to_out.0` row-parallel, self and cross)
    /// and the feed-forward (`net.0.proj` column, `net.2` row) read from `split`, this rank's
    /// H/T heads and 4·D/T hidden features; everything else (norms, modulation tables,
    /// adaLN-single, caption projection, patch embedding, final layer) whole from `vb`. The
    /// forward then needs the tp group in its [`ForwardContext::tp`].
    pub fn new_shard(
        cfg: &Config,
        vb: VarBuilder,
        split: SplitWeights,
        tp: TpRank,
        stage: Option<&PipelineStage>,
    ) -> Result<Self> {
        let StageLayers {
            layers,
            first,
            last,
        } = common::stage_layers(cfg, stage)?;
        common::check_tp_heads(CLASS_NAME, cfg.num_attention_heads, tp)?;
        let activation = FeedForwardActivation::from_diffusers_name(&cfg.activation_fn)
            .expect("validated activation");
        let dim = cfg.inner_dim();
        let p = cfg.patch_size;
        let out_channels = cfg.out_channels();
        let pos_embed = first
            .then(|| {
                PatchEmbed::new(
                    cfg.sample_size,
                    p,
                    cfg.in_channels,
                    dim,
                    cfg.interpolation_scale(),
                    vb.pp("pos_embed"),
                )
            })
            .transpose()?;
        let transformer_blocks = layers
            .clone()
            .map(|i| {
                BasicTransformerBlock::new(
                    cfg,
                    activation,
                    tp,
                    vb.pp("transformer_blocks").pp(i),
                    &split.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer = last
            .then(|| -> candle_core::Result<_> {
                Ok((
                    vb.get((2, dim), "scale_shift_table")?,
                    candle_nn::linear(dim, p * p * out_channels, vb.pp("proj_out"))?,
                ))
            })
            .transpose()?;
        let caption_projection = match cfg.caption_channels {
            Some(c) => Some(PixArtAlphaTextProjection::new(
                c,
                dim,
                vb.pp("caption_projection"),
            )?),
            None => None,
        };
        let info = BackboneInfo {
            class_name: CLASS_NAME,
            num_layers: cfg.num_layers,
            num_attention_heads: cfg.num_attention_heads,
            attention_head_dim: cfg.attention_head_dim,
            in_channels: cfg.in_channels,
            out_channels,
            patch_size: p,
            sample_size: cfg.sample_size,
            caption_channels: cfg
                .caption_channels
                .or(cfg.cross_attention_dim)
                .unwrap_or(dim),
            updates_text_stream: false,
        };
        Ok(Self {
            info,
            config: cfg.clone(),
            pos_embed,
            adaln_single: AdaLayerNormSingle::new(
                dim,
                cfg.use_additional_conditions(),
                vb.pp("adaln_single"),
            )?,
            caption_projection,
            transformer_blocks,
            layers,
            norm_out: LayerNorm::without_affine(1e-6),
            final_layer,
            parameter_bytes: None,
            dtype: vb.dtype(),
            tp,
        })
    }

    /// Reads `dir/config.json` and the weights in `dir` (only a stage's, with
    /// `options.stage`; only shard `options.tp` of the split layers, each rank copying only
    /// its bytes out of the files); errors name the file, and the field or tensor at fault.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let (mut model, replicated) =
            common::load_stage_split(dir, options, |cfg, vb, split, stage| {
                Self::new_shard(cfg, vb, split, options.tp, stage)
            })?;
        model.parameter_bytes = Some(replicated + model.split_parameter_bytes());
        Ok(model)
    }

    /// Bytes of the split layers' weights (attention and feed-forward of the blocks held) that
    /// this instance keeps: 1/T of the whole model's.
    pub fn split_parameter_bytes(&self) -> u64 {
        self.transformer_blocks
            .iter()
            .map(|b| b.split_parameter_bytes() as u64)
            .sum()
    }

    /// The tensor-parallel shard this instance holds.
    pub fn tp_rank(&self) -> TpRank {
        self.tp
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// diffusers turns a (B, L) 0/1 mask into a (B, 1, L) bias of 0 / −10000; a 3-D input is
    /// already such a bias. Returned as (B, 1, 1, L), broadcastable over heads and queries.
    fn encoder_bias(&self, mask: &Tensor) -> Result<Tensor> {
        let mask = mask.to_dtype(self.dtype)?;
        let bias = match mask.rank() {
            2 => ((1.0 - mask)? * -10000.0)?,
            3 => mask.squeeze(1)?,
            r => {
                return Err(Error::invalid(format!(
                    "encoder_attention_mask must be (B, L) or (B, 1, L), got rank {r}"
                )))
            }
        };
        let (b, l) = bias.dims2()?;
        Ok(bias.reshape((b, 1, 1, l))?)
    }

    fn patch_embedding(&self) -> Result<&PatchEmbed> {
        self.pos_embed
            .as_ref()
            .ok_or_else(|| common::no_patch_embedding(CLASS_NAME, &self.layers))
    }

    /// The conditioning part of `embed`: adaLN-single, caption projection, text mask bias,
    /// around the image tokens `hidden` of a `grid`.
    fn conditioned_state(
        &self,
        inputs: &BackboneInputs,
        hidden: Tensor,
        grid: (usize, usize),
    ) -> Result<BlockState> {
        let batch = inputs.hidden_states.dim(0)?;
        let timestep = common::batch_timesteps(inputs.timestep, batch)?;
        let cond = inputs.conditioning;
        let (resolution, aspect_ratio) = (cond.get(RESOLUTION), cond.get(ASPECT_RATIO));
        if self.adaln_single.uses_additional_conditions()
            && (resolution.is_none() || aspect_ratio.is_none())
        {
            return Err(Error::invalid(
                "this PixArt model uses additional conditions: resolution and aspect_ratio are required",
            ));
        }
        let (block_conditioning, head_conditioning) =
            self.adaln_single
                .forward(&timestep, resolution, aspect_ratio, self.dtype)?;

        let encoder = cond
            .require(names::ENCODER_HIDDEN_STATES, CLASS_NAME)?
            .to_dtype(self.dtype)?;
        let encoder = match &self.caption_projection {
            Some(proj) => proj.forward(&encoder)?,
            None => encoder,
        };
        let encoder_bias = cond
            .get(names::ENCODER_ATTENTION_MASK)
            .map(|m| self.encoder_bias(m))
            .transpose()?;

        Ok(BlockState {
            hidden,
            encoder: Some(encoder),
            encoder_bias,
            conditioning: Conditioning::new()
                .with(BLOCK_MODULATION, block_conditioning)
                .with(HEAD_CONDITIONING, head_conditioning),
            grid,
        })
    }
}

impl Backbone for PixArtTransformer2DModel {
    fn info(&self) -> &BackboneInfo {
        &self.info
    }

    fn embed(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<BlockState> {
        let (hidden, grid) = common::embed_image(
            self.patch_embedding(),
            inputs.hidden_states,
            ctx,
            &self.info,
            self.dtype,
        )?;
        self.conditioned_state(inputs, hidden, grid)
    }

    fn embed_conditioning(
        &self,
        inputs: &BackboneInputs,
        ctx: &ForwardContext,
    ) -> Result<BlockState> {
        let (hidden, grid) =
            common::no_image_tokens(inputs.hidden_states, ctx, &self.info, self.dtype)?;
        self.conditioned_state(inputs, hidden, grid)
    }

    fn held_layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    fn parameter_bytes(&self) -> Option<u64> {
        self.parameter_bytes
    }

    fn blocks(
        &self,
        mut state: BlockState,
        layers: Range<usize>,
        ctx: &ForwardContext,
    ) -> Result<BlockState> {
        let blocks = common::held_blocks(
            &self.transformer_blocks,
            &layers,
            &self.layers,
            self.info.num_layers,
        )?;
        let processor = common::block_processor(ctx)?;
        self.tp.check_group(ctx.tp.as_ref(), CLASS_NAME)?;
        let tp = ctx.tp.as_ref().filter(|_| !self.tp.is_serial());
        for (layer, block) in layers.zip(blocks) {
            state.hidden = block.forward(&state.hidden, &state, layer, processor, tp)?;
        }
        Ok(state)
    }

    fn modulated_input(&self, state: &BlockState, _ctx: &ForwardContext) -> Result<Option<Tensor>> {
        let first = common::held_blocks(
            &self.transformer_blocks,
            &(0..1),
            &self.layers,
            self.info.num_layers,
        )?;
        Ok(Some(first[0].modulated_input(&state.hidden, state)?))
    }

    fn head(&self, state: BlockState, ctx: &ForwardContext) -> Result<Tensor> {
        common::check_head_tokens(&state, ctx)?;
        let (batch, _, dim) = state.hidden.dims3()?;
        let (scale_shift_table, proj_out) = self
            .final_layer
            .as_ref()
            .ok_or_else(|| common::no_final_layer(CLASS_NAME, &self.layers))?;
        // (2, D) + (B, 1, D) -> shift, scale (B, 1, D)
        let table = scale_shift_table.unsqueeze(0)?.broadcast_add(
            &state
                .conditioning(HEAD_CONDITIONING)?
                .reshape((batch, 1, dim))?,
        )?;
        let (shift, scale) = (table.narrow(1, 0, 1)?, table.narrow(1, 1, 1)?);
        let hidden = modulate(&self.norm_out.forward(&state.hidden)?, &shift, &scale)?;
        let hidden = proj_out.forward(&hidden)?;
        common::gather_and_unpatchify(hidden, state.grid, ctx, &self.info)
    }
}

fn load_backbone(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backbone>> {
    Ok(Box::new(PixArtTransformer2DModel::load(dir, options)?))
}

fn is_ada_norm_single(config: &serde_json::Value) -> bool {
    config.get("norm_type").and_then(|v| v.as_str()) == Some("ada_norm_single")
}

xfuser_core::inventory::submit! {
    TransformerEntry {
        class_name: CLASS_NAME,
        load: load_backbone,
        shape: common::config_shape::<Config>,
        tensor_parallel: true,
    }
}

// diffusers' `_CLASS_REMAPPING_DICT`: PixArt-α checkpoints still name `Transformer2DModel`.
xfuser_core::inventory::submit! {
    ClassAlias {
        kind: Kind::Transformer,
        alias: "Transformer2DModel",
        target: CLASS_NAME,
        applies: is_ada_norm_single,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Config {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_diffusers() {
        let cfg = parse("{}");
        assert_eq!(cfg.inner_dim(), 1152);
        assert_eq!(cfg.out_channels(), 8);
        assert!(cfg.use_additional_conditions());
        assert_eq!(cfg.interpolation_scale(), 2.0);
        let cfg = parse(r#"{"sample_size": 64, "out_channels": null}"#);
        assert_eq!(cfg.out_channels(), 4);
        assert!(!cfg.use_additional_conditions());
        assert_eq!(cfg.interpolation_scale(), 1.0);
        let cfg = parse(r#"{"sample_size": 32, "interpolation_scale": 0.5}"#);
        assert_eq!(cfg.interpolation_scale(), 0.5);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unsupported_configs_name_the_field() {
        let bad = [
            (
                r#"{"norm_type": "ada_norm_zero"}"#,
                "norm_type",
                "ada_norm_zero",
            ),
            (
                r#"{"num_embeds_ada_norm": null}"#,
                "num_embeds_ada_norm",
                "null",
            ),
            (r#"{"activation_fn": "geglu"}"#, "activation_fn", "geglu"),
            (r#"{"attention_type": "gated"}"#, "attention_type", "gated"),
            (
                r#"{"num_attention_heads": 2, "attention_head_dim": 32}"#,
                "use_additional_conditions",
                "64",
            ),
            (
                r#"{"cross_attention_dim": 77, "caption_channels": 32}"#,
                "cross_attention_dim",
                "77",
            ),
        ];
        for (json, field, value) in bad {
            let p = parse(json).validate().unwrap_err();
            assert_eq!(p.field, field, "{json}");
            assert!(p.message.contains(value), "{json}: {}", p.message);
        }
    }
}
