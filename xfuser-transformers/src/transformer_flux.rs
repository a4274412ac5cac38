//! Flux.1 diffusion transformer, a port of diffusers'
//! `models/transformers/transformer_flux.py` (`FluxTransformer2DModel`, with
//! `FluxTransformerBlock`, `FluxSingleTransformerBlock`, `FluxAttention` and `FluxPosEmbed`).
//!
//! Flux runs `num_layers` double-stream blocks (image and text keep their own weights and
//! attend jointly, as SD3's MMDiT blocks; q/k RMS norms) and then `num_single_layers`
//! single-stream blocks (one set of weights over text and image: adaLN-zero with three chunks,
//! attention in parallel with an MLP, one output projection of both). Positions are rotary:
//! each image token has the ids (0, row, col) of its place in the packed latent, each text
//! token (0, 0, 0), and the head dimension is split between the axes (`axes_dims_rope`).
//! `guidance_embeds` (Flux-dev) adds an embedding of the guidance value to the timestep's.
//!
//! # The contract (see docs/model-contract.md)
//!
//! - **Latent layout.** The runtime holds latents in image layout, (B, 16, H, W). `embed`
//!   packs 2×2 latent pixels into one token as FluxPipeline's `_pack_latents` does (token
//!   values in (channel, row, column) order, `in_channels` = 64 for 16 latent channels) and
//!   `head` unpacks as `_unpack_latents`. So [`BackboneInfo`] says `patch_size` 2 and
//!   `in_channels` / `out_channels` `config.in_channels / 4`; the config's own `patch_size`
//!   must be 1 (every Flux checkpoint's).
//! - **Timestep scale.** [`BackboneInputs::timestep`] is the scheduler's timestep (0..1000),
//!   as for every backbone. diffusers' FluxPipeline passes `timestep / 1000` to the
//!   transformer, which multiplies it by 1000 again; both roundings are kept here (the
//!   division in f32, the latents' dtype, the multiplication in the model dtype), so the
//!   result is diffusers' to the bit. The guidance value (`names::GUIDANCE`, the guidance
//!   scale, e.g. 3.5) is passed as is and multiplied by 1000 in the model dtype.
//! - **Conditioning.** `names::ENCODER_HIDDEN_STATES` (B, L, joint_attention_dim) (T5),
//!   `names::POOLED_PROJECTIONS` (B, pooled_projection_dim) (CLIP), and `names::GUIDANCE`
//!   (B,) or one value, required iff `guidance_embeds` (ignored otherwise).
//! - **Blocks.** The runtime's blocks are the double blocks then the single blocks: block
//!   `i < num_layers` is double block `i`, block `i ≥ num_layers` is single block
//!   `i − num_layers`; [`BackboneInfo::num_layers`] is their sum, and PipeFusion stages split
//!   that combined list. Block `i` is attention site `i`.
//! - **The text stream.** Every block updates it ([`BackboneInfo::updates_text_stream`]), and
//!   [`BlockState::encoder`] holds it through all blocks: the single blocks, which diffusers
//!   runs on the concatenated [text, image] sequence, keep text and image apart here (the
//!   norms, projections and MLP act token by token, so nothing changes) and join them only
//!   in the attention, through the processor's `joint_attention` (image tokens as q/k/v, the
//!   text as [`JointText`]).
//! - **RoPE.** `embed` computes the cos/sin tables of the image tokens this forward holds
//!   (with sequence parallelism, the rank's token rows; its padding tokens get id 0, they are
//!   dropped) and stores them in [`BlockState::conditioning`] ([`ROPE_COS`], [`ROPE_SIN`],
//!   (S, head_dim / 2)); the blocks rotate the image queries and keys before the processor.
//!   Text ids are zeros, whose rotation is the identity, so the text is not rotated.
//!
//! Sequence parallelism and PipeFusion stages work as for SD3 (`transformer_sd3`): `embed`
//! packs only the rank's token rows, the text stays whole, `head` gathers the projected
//! tokens over the sp group; a stage loads its blocks, the `x_embedder` on the first stage,
//! `norm_out` / `proj_out` on the last, and the conditioning modules (`time_text_embed`,
//! `context_embedder`) everywhere.
//!
//! Tensor parallelism ([`FluxTransformer2DModel::new_shard`], docs/tensor-parallel.md): each
//! rank of a tp group of T holds H/T heads of every attention (the q/k norms and RoPE act per
//! head, so they run on the local heads unchanged) and 4·D/T features of every MLP; the
//! attention and MLP outputs are partial sums, all-reduced over [`ForwardContext::tp`] (image
//! and text streams in one collective): twice per double block, once per single block.
//! Everything else is replicated.

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor, TensorId};
use candle_nn::{Linear, VarBuilder};
use xfuser_core::attention::{AttentionProcessor, JointText, SerialAttention};
use xfuser_core::backbone::{
    names, Backbone, BackboneInfo, BackboneInputs, BlockState, Conditioning, ForwardContext,
    PipelineStage,
};
use xfuser_core::distributed::{ProcessGroup, TpRank};
use xfuser_core::kernels;
use xfuser_core::registry::{LoadOptions, ModelShape, TransformerEntry};
use xfuser_core::{Error, Result};
use xfuser_layers::embeddings::{
    apply_rotary_emb_pairs, multi_axis_rotary_tables, CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
};
use xfuser_layers::feed_forward::{FeedForwardActivation, ParallelFeedForward};
use xfuser_layers::normalization::{AdaLayerNormContinuous, RmsNorm};
use xfuser_layers::tensor_parallel::{ColumnParallelLinear, RowParallelLinear, SplitWeights};

pub use crate::backbone_common::ConfigProblem;
use crate::backbone_common::{self as common, ModelConfig, PatchRows, StageLayers};

pub const CLASS_NAME: &str = "FluxTransformer2DModel";

/// The block state's (B, D) `temb`: the timestep embedding (plus the guidance embedding on
/// Flux-dev) plus the projected pooled text, which every block's adaLN and `norm_out` read.
pub const TEMB: &str = "temb";
/// The block state's (S, head_dim / 2) cosines of the rotary angles of the image tokens it
/// holds (f32).
pub const ROPE_COS: &str = "rope_cos";
/// The sines that go with [`ROPE_COS`].
pub const ROPE_SIN: &str = "rope_sin";

/// Latent pixels per token side: FluxPipeline packs 2×2 latent pixels into a token.
pub const PACKING: usize = 2;

/// The latent side of Flux's 1024-pixel images, [`BackboneInfo::sample_size`] (Flux's config
/// has no `sample_size`).
pub const DEFAULT_SAMPLE_SIZE: usize = 128;

/// Epsilon of every LayerNorm and RMSNorm of the model.
const NORM_EPS: f64 = 1e-6;

/// `FluxPosEmbed`'s theta.
const ROPE_THETA: f64 = 10000.0;

/// `config.json` of a Flux transformer, field for field with diffusers' defaults (Flux.1-dev's
/// sizes).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Config {
    /// Must be 1: the pipeline packs 2×2 latent pixels into a token itself.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Values per packed token: 4 × the latent channels.
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// null (the default): `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of `encoder_hidden_states` (T5).
    #[serde(default = "default_joint_attention_dim")]
    pub joint_attention_dim: usize,
    /// Width of `pooled_projections` (CLIP).
    #[serde(default = "default_pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    /// Whether the guidance value is embedded (Flux.1-dev) or not (Flux.1-schnell).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Head dimensions of the rotary axes (0, row, col); they sum to `attention_head_dim`.
    #[serde(default = "default_axes_dims_rope")]
    pub axes_dims_rope: Vec<usize>,
}

fn default_patch_size() -> usize {
    1
}
fn default_in_channels() -> usize {
    64
}
fn default_num_layers() -> usize {
    19
}
fn default_num_single_layers() -> usize {
    38
}
fn default_attention_head_dim() -> usize {
    128
}
fn default_num_attention_heads() -> usize {
    24
}
fn default_joint_attention_dim() -> usize {
    4096
}
fn default_pooled_projection_dim() -> usize {
    768
}
fn default_axes_dims_rope() -> Vec<usize> {
    vec![16, 56, 56]
}

impl Config {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Values per output token.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The blocks of the runtime: double blocks, then single blocks.
    pub fn total_layers(&self) -> usize {
        self.num_layers + self.num_single_layers
    }

    /// Checks that the model described can be built and run; names the first bad field.
    pub fn validate(&self) -> std::result::Result<(), ConfigProblem> {
        let problem = |field, message: String| Err(ConfigProblem { field, message });
        if self.patch_size != 1 {
            return problem(
                "patch_size",
                format!(
                    "{} is not supported by {CLASS_NAME}: only 1, with the pipeline's 2×2 \
                     packing of latent pixels into tokens",
                    self.patch_size
                ),
            );
        }
        common::check_attention_heads(self.num_attention_heads, self.attention_head_dim)?;
        if self.total_layers() == 0 {
            return problem(
                "num_layers",
                "0 double and 0 single blocks: the model needs at least one block".into(),
            );
        }
        common::check_channels(self.in_channels, self.out_channels())?;
        let per_token = PACKING * PACKING;
        for (field, n) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels()),
        ] {
            if !n.is_multiple_of(per_token) {
                return problem(
                    field,
                    format!(
                        "{n} is not a multiple of {per_token}: a token packs 2×2 latent pixels \
                         of every channel"
                    ),
                );
            }
        }
        let rope_dim: usize = self.axes_dims_rope.iter().sum();
        if self.axes_dims_rope.is_empty()
            || self.axes_dims_rope.iter().any(|d| d % 2 == 1)
            || rope_dim != self.attention_head_dim
        {
            return problem(
                "axes_dims_rope",
                format!(
                    "{:?} must be even dimensions summing to attention_head_dim ({})",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            );
        }
        if self.joint_attention_dim == 0 || self.pooled_projection_dim == 0 {
            return problem(
                "joint_attention_dim",
                "text widths (joint_attention_dim, pooled_projection_dim) must be positive".into(),
            );
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
            num_layers: self.total_layers(),
        }
    }
}

/// `x_embedder` after the pipeline's packing: 2×2 latent pixels of every channel into one
/// token, values in (channel, row, column) order, then a linear layer.
#[derive(Debug)]
struct PackedEmbed {
    /// (D, in_channels) as [`kernels::gemm_friendly_weight`].
    weight: Tensor,
    bias: Tensor,
}

impl PatchRows for PackedEmbed {
    /// The tokens of the packed rows `rows` of a (B, C, H, W) latent: (B, rows.len()·W/2, D).
    fn forward_rows(&self, latent: &Tensor, rows: Range<usize>) -> Result<Tensor> {
        let (b, c, h, w) = latent.dims4()?;
        let p = PACKING;
        let cols = w / p;
        let n = rows.len();
        let part = if n * p == h {
            latent.clone()
        } else {
            latent.narrow(2, rows.start * p, n * p)?
        };
        // (B, C, n·2, W) -> (B, n·cols, C·2·2): `_pack_latents`' layout.
        let tokens = part
            .reshape((b, c, n, p, cols, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, n * cols, c * p * p))?;
        Ok(kernels::matmul_t(&tokens, &self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// (B, rows·cols, C·2·2) tokens -> (B, C, rows·2, cols·2): `_unpack_latents`.
fn unpack(xs: &Tensor, grid: (usize, usize), channels: usize) -> candle_core::Result<Tensor> {
    let b = xs.dim(0)?;
    let (rows, cols) = grid;
    let p = PACKING;
    xs.reshape((b, rows, cols, channels, p, p))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, channels, rows * p, cols * p))
}

/// The q, k, v projections of one token stream, fused into one matrix product, with their
/// RMS norms of q and k. Under tensor parallelism each projection is column-parallel: this
/// rank's heads only (the per-head norms act on each head alone, so they are whole).
#[derive(Debug)]
struct QkvProjection {
    /// [q; k; v] (3·inner/T, D) and their biases.
    weight: Tensor,
    bias: Option<Tensor>,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// Bytes of the split weights kept.
    split_bytes: usize,
}

impl QkvProjection {
    /// `names` are the q, k, v projection modules (shard `tp` of each, from `split`) and the
    /// q, k norms (whole, from `vb`).
    fn new(
        cfg: &Config,
        names: [&str; 5],
        vb: &VarBuilder,
        tp: TpRank,
        split: &SplitWeights,
    ) -> Result<Self> {
        let dim = cfg.inner_dim();
        let proj = |name: &str| ColumnParallelLinear::load(dim, dim, true, tp, &split.pp(name));
        let (q, k, v) = (proj(names[0])?, proj(names[1])?, proj(names[2])?);
        let split_bytes = [&q, &k, &v].iter().map(|l| l.parameter_bytes()).sum();
        let (weight, bias) = common::fuse_columns(&[&q, &k, &v])?;
        let norm = |name: &str| RmsNorm::new(cfg.attention_head_dim, NORM_EPS, true, vb.pp(name));
        Ok(Self {
            weight,
            bias,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
            split_bytes,
        })
    }

    /// (B, S, D) -> q, k, v (B, H, S, Dh), q and k normalized and, with `rope`, rotated.
    fn forward(
        &self,
        xs: &Tensor,
        heads: usize,
        rope: Option<&Rope>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut parts = kernels::split_heads(
            &kernels::matmul_t(xs, &self.weight)?,
            self.bias.as_ref(),
            3,
            heads,
        )?;
        let v = parts.pop().expect("three parts");
        let k = self.norm_k.forward(&parts.pop().expect("three parts"))?;
        let q = self.norm_q.forward(&parts.pop().expect("three parts"))?;
        Ok(match rope {
            Some(r) => (r.apply(&q)?, r.apply(&k)?, v),
            None => (q, k, v),
        })
    }
}

/// The rotary tables of the image tokens a forward holds.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn of(state: &BlockState) -> Result<Self> {
        Ok(Self {
            cos: state.conditioning(ROPE_COS)?.clone(),
            sin: state.conditioning(ROPE_SIN)?.clone(),
        })
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(apply_rotary_emb_pairs(x, &self.cos, &self.sin)?)
    }
}

/// The heads a rank computes (all H, or H/T of a tensor-parallel shard) and the attention
/// scale.
#[derive(Debug, Clone, Copy)]
struct Heads {
    heads: usize,
    head_dim: usize,
}

impl Heads {
    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// (B, H, S, Dh) -> (B, S, H·Dh).
    fn merge(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, s, _) = xs.dims4()?;
        xs.transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, self.heads * self.head_dim))
    }

    /// The joint attention of the image tokens (q, k, v (B, H, N, Dh)) and the text (B, H, L,
    /// Dh), through the processor as site `layer`: image (B, N, D) and text (B, L, D) outputs,
    /// heads merged.
    fn joint_attention(
        &self,
        image: (Tensor, Tensor, Tensor),
        text: (Tensor, Tensor, Tensor),
        layer: usize,
        processor: &dyn AttentionProcessor,
    ) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = image;
        let (tq, tk, tv) = text;
        let scale = self.scale();
        if processor.name() == SerialAttention.name() {
            // One softmax over image and text keys (image first; diffusers puts the text
            // first, which changes nothing but the order of the sums), fused, heads merged.
            let join = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 2);
            let n = q.dim(2)?;
            let out = kernels::attention_merged(
                &join(&q, &tq)?,
                &join(&k, &tk)?,
                &join(&v, &tv)?,
                None,
                scale,
            )?;
            let l = out.dim(1)? - n;
            return Ok((out.narrow(1, 0, n)?, out.narrow(1, n, l)?));
        }
        let joint = JointText {
            q: &tq,
            k: &tk,
            v: &tv,
        };
        let (image, text) = processor.joint_attention(layer, &q, &k, &v, joint, scale)?;
        Ok((self.merge(&image)?, self.merge(&text)?))
    }
}

fn gemm_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    kernels::gemm_friendly_linear(&candle_nn::linear(in_dim, out_dim, vb)?)
}

/// `x·wᵀ + b` of a gemm-friendly linear layer.
fn linear_forward(xs: &Tensor, l: &Linear) -> Result<Tensor> {
    let out = kernels::matmul_t(xs, l.weight())?;
    Ok(match l.bias() {
        Some(b) => out.broadcast_add(b)?,
        None => out,
    })
}

/// diffusers' `FluxTransformerBlock`: adaLN-zero of each stream, joint attention, a
/// feed-forward per stream. Under tensor parallelism (as SD3's joint blocks) the q/k/v
/// projections of both streams are column-parallel (this rank's heads), `to_out.0` and
/// `to_add_out` row-parallel, and both feed-forwards column then row: the block all-reduces
/// twice, the attention outputs of both streams together, then their feed-forwards'.
#[derive(Debug)]
struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    image: QkvProjection,
    text: QkvProjection,
    to_out: RowParallelLinear,
    to_add_out: RowParallelLinear,
    ff: ParallelFeedForward,
    ff_context: ParallelFeedForward,
    heads: Heads,
    dim: usize,
}

impl DoubleBlock {
    /// Shard `tp` of the block: attention and feed-forward layers from `split`, the rest
    /// whole from `vb`.
    fn new(cfg: &Config, vb: VarBuilder, tp: TpRank, split: &SplitWeights) -> Result<Self> {
        let dim = cfg.inner_dim();
        let attn = vb.pp("attn");
        let split_attn = split.pp("attn");
        let ff = |name: &str| {
            ParallelFeedForward::load(
                dim,
                4 * dim,
                FeedForwardActivation::GeluTanh,
                tp,
                &split.pp(name),
            )
        };
        let out = |name: &str| RowParallelLinear::load(dim, dim, true, tp, &split_attn.pp(name));
        Ok(Self {
            norm1: gemm_linear(dim, 6 * dim, vb.pp("norm1").pp("linear"))?,
            norm1_context: gemm_linear(dim, 6 * dim, vb.pp("norm1_context").pp("linear"))?,
            image: QkvProjection::new(
                cfg,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &attn,
                tp,
                &split_attn,
            )?,
            text: QkvProjection::new(
                cfg,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                &attn,
                tp,
                &split_attn,
            )?,
            to_out: out("to_out.0")?,
            to_add_out: out("to_add_out")?,
            ff: ff("ff")?,
            ff_context: ff("ff_context")?,
            heads: Heads {
                heads: cfg.num_attention_heads / tp.size,
                head_dim: cfg.attention_head_dim,
            },
            dim,
        })
    }

    /// Bytes of the split layers' weights this rank keeps.
    fn split_parameter_bytes(&self) -> usize {
        self.image.split_bytes
            + self.text.split_bytes
            + self.to_out.parameter_bytes()
            + self.to_add_out.parameter_bytes()
            + self.ff.parameter_bytes()
            + self.ff_context.parameter_bytes()
    }

    /// (image (B, N, D), text (B, L, D)) -> the same, updated; `tp` is the group the split
    /// layers' partial outputs are all-reduced over (None: whole layers).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        hidden: &Tensor,
        encoder: &Tensor,
        temb_silu: &Tensor,
        rope: &Rope,
        layer: usize,
        processor: &dyn AttentionProcessor,
        tp: Option<&ProcessGroup>,
    ) -> Result<(Tensor, Tensor)> {
        let dim = self.dim;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        let m = common::modulation_chunks(&self.norm1.forward(temb_silu)?, 6, dim)?;
        let c = common::modulation_chunks(&self.norm1_context.forward(temb_silu)?, 6, dim)?;
        let normed = common::norm_modulate(hidden, &m[0], &m[1])?;
        let normed_context = common::norm_modulate(encoder, &c[0], &c[1])?;
        let heads = self.heads.heads;
        let image = self.image.forward(&normed, heads, Some(rope))?;
        let text = self.text.forward(&normed_context, heads, None)?;
        let (attn, context_attn) = self.heads.joint_attention(image, text, layer, processor)?;
        let (attn, context_attn) = common::tp_all_reduce_pair(
            self.to_out.forward_partial(&attn)?,
            self.to_add_out.forward_partial(&context_attn)?,
            tp,
        )?;

        let hidden = kernels::gated_residual(hidden, Some(&m[2]), &attn, self.to_out.bias())?;
        let encoder =
            kernels::gated_residual(encoder, Some(&c[2]), &context_attn, self.to_add_out.bias())?;
        let normed = common::norm_modulate(&hidden, &m[3], &m[4])?;
        let normed_context = common::norm_modulate(&encoder, &c[3], &c[4])?;
        let (ff, ff_context) = common::tp_all_reduce_pair(
            self.ff.forward_partial(&normed)?,
            self.ff_context.forward_partial(&normed_context)?,
            tp,
        )?;
        let hidden = kernels::gated_residual(&hidden, Some(&m[5]), &ff, self.ff.out_bias())?;
        let encoder = kernels::gated_residual(
            &encoder,
            Some(&c[5]),
            &ff_context,
            self.ff_context.out_bias(),
        )?;
        Ok((hidden, encoder))
    }
}

/// diffusers' `FluxSingleTransformerBlock`, run on the image and the text kept apart: one
/// adaLN-zero (three chunks), attention (no output projection) in parallel with a GELU MLP,
/// `proj_out` of both joined, a gated residual. Under tensor parallelism q/k/v and `proj_mlp`
/// are column-parallel and `proj_out` row-parallel over its two input segments, [attention
/// D, mlp 4·D]: a rank's input is [its heads' attention, its slice of the MLP], so it keeps
/// those columns of each segment (not an even cut of the D + 4·D columns). One all-reduce per
/// block, both streams together.
#[derive(Debug)]
struct SingleBlock {
    norm: Linear,
    qkv: QkvProjection,
    proj_mlp: ColumnParallelLinear,
    proj_out: RowParallelLinear,
    heads: Heads,
    dim: usize,
}

impl SingleBlock {
    /// Shard `tp` of the block: q/k/v, `proj_mlp` and `proj_out` from `split`, the rest whole
    /// from `vb`.
    fn new(cfg: &Config, vb: VarBuilder, tp: TpRank, split: &SplitWeights) -> Result<Self> {
        let dim = cfg.inner_dim();
        let mlp = 4 * dim;
        Ok(Self {
            norm: gemm_linear(dim, 3 * dim, vb.pp("norm").pp("linear"))?,
            qkv: QkvProjection::new(
                cfg,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &vb.pp("attn"),
                tp,
                &split.pp("attn"),
            )?,
            proj_mlp: ColumnParallelLinear::load(dim, mlp, true, tp, &split.pp("proj_mlp"))?,
            proj_out: RowParallelLinear::load_fused(
                &[dim, mlp],
                dim,
                true,
                tp,
                &split.pp("proj_out"),
            )?,
            heads: Heads {
                heads: cfg.num_attention_heads / tp.size,
                head_dim: cfg.attention_head_dim,
            },
            dim,
        })
    }

    /// Bytes of the split layers' weights this rank keeps.
    fn split_parameter_bytes(&self) -> usize {
        self.qkv.split_bytes + self.proj_mlp.parameter_bytes() + self.proj_out.parameter_bytes()
    }

    /// (image (B, N, D), text (B, L, D)) -> the same, updated; `tp` as for [`DoubleBlock`].
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        hidden: &Tensor,
        encoder: &Tensor,
        temb_silu: &Tensor,
        rope: &Rope,
        layer: usize,
        processor: &dyn AttentionProcessor,
        tp: Option<&ProcessGroup>,
    ) -> Result<(Tensor, Tensor)> {
        // shift, scale, gate
        let m = common::modulation_chunks(&self.norm.forward(temb_silu)?, 3, self.dim)?;
        let heads = self.heads.heads;
        let prepare = |xs: &Tensor, rope: Option<&Rope>| -> Result<_> {
            let normed = common::norm_modulate(xs, &m[0], &m[1])?;
            let qkv = self.qkv.forward(&normed, heads, rope)?;
            let (mlp, bias) = self.proj_mlp.forward_local_without_bias(&normed)?;
            Ok((qkv, kernels::bias_gelu_tanh(&mlp, bias)?))
        };
        let (image, image_mlp) = prepare(hidden, Some(rope))?;
        let (text, text_mlp) = prepare(encoder, None)?;
        let (attn, context_attn) = self.heads.joint_attention(image, text, layer, processor)?;
        // [attention, mlp] as proj_out's (local) input.
        let project = |attn: &Tensor, mlp: &Tensor| -> Result<Tensor> {
            self.proj_out
                .forward_partial(&Tensor::cat(&[attn, mlp], 2)?)
        };
        let (out, context_out) = common::tp_all_reduce_pair(
            project(&attn, &image_mlp)?,
            project(&context_attn, &text_mlp)?,
            tp,
        )?;
        let bias = self.proj_out.bias();
        Ok((
            kernels::gated_residual(hidden, Some(&m[2]), &out, bias)?,
            kernels::gated_residual(encoder, Some(&m[2]), &context_out, bias)?,
        ))
    }
}

/// One of the runtime's blocks (boxed: the split layers make both large, and unequal).
#[derive(Debug)]
enum FluxBlock {
    Double(Box<DoubleBlock>),
    Single(Box<SingleBlock>),
}

/// `time_text_embed`, with or without the guidance embedder.
#[derive(Debug)]
enum TimeTextEmbed {
    Plain(CombinedTimestepTextProjEmbeddings),
    Guidance(CombinedTimestepGuidanceTextProjEmbeddings),
}

/// TeaCache's rescaling polynomial for FLUX.1 (highest power first), as TeaCache's authors
/// fitted it (TeaCache4FLUX; xDiT uses the same numbers).
const TEACACHE_COEFFICIENTS: [f64; 5] = [
    4.98651651e+02,
    -2.83781631e+02,
    5.58554382e+01,
    -3.82021401e+00,
    2.64230861e-01,
];

/// Text tensors whose `context_embedder` output is kept (both CFG halves of two rank threads
/// sharing a model, say).
const CONTEXT_CACHE_ENTRIES: usize = 2;

/// The rotary tables of the last token layout seen: (token rows, columns, tokens held).
type RopeKey = (Range<usize>, usize, usize);

/// diffusers' `FluxTransformer2DModel`, or one PipeFusion stage of it.
#[derive(Debug)]
pub struct FluxTransformer2DModel {
    info: BackboneInfo,
    config: Config,
    /// None on PipeFusion stages after the first.
    x_embedder: Option<PackedEmbed>,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    /// The text stream of the last `encoder_hidden_states` seen, by tensor id (candle tensors
    /// are immutable, so an id names one content).
    context_cache: Mutex<Vec<(TensorId, Tensor)>>,
    rope_cache: Mutex<Option<(RopeKey, Tensor, Tensor)>>,
    /// The blocks `layers` of the combined list (double, then single).
    blocks: Vec<FluxBlock>,
    layers: Range<usize>,
    /// `norm_out` and `proj_out`; None on PipeFusion stages before the last.
    final_layer: Option<(AdaLayerNormContinuous, Linear)>,
    parameter_bytes: Option<u64>,
    dtype: DType,
    /// The tensor-parallel shard this instance holds (the whole model: serial).
    tp: TpRank,
}

impl FluxTransformer2DModel {
    /// Builds the model from `vb` (the weights' root, names as in diffusers' state dict).
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::new_stage(cfg, vb, None)
    }

    /// Builds the whole model (`stage` None) or one PipeFusion stage of it (its share of the
    /// combined double + single block list), fetching only the weights that stage holds.
    pub fn new_stage(
        cfg: &Config,
        vb: VarBuilder,
        stage: Option<&PipelineStage>,
    ) -> candle_core::Result<Self> {
        common::serial_shard(cfg, vb, stage, Self::new_shard)
    }

    /// Builds tensor-parallel shard `tp` of the whole model or of a PipeFusion stage. Read
    /// from `split`, this rank's H/T heads and 4·D/T MLP features: in the double blocks the
    /// q/k/v projections of both streams (column-parallel), `to_out.0` and `to_add_out`
    /// (row-parallel) and both feed-forwards (`net.0.proj` column, `net.2` row); in the single
    /// blocks q/k/v and `proj_mlp` (column-parallel) and `proj_out` (row-parallel over the
    /// [attention, mlp] segments of its input). Everything else (the q/k norms, the adaLN
    /// modulations, embeddings, final layer) whole from `vb`. The forward then needs the tp
    /// group in its [`ForwardContext::tp`].
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
        let dim = cfg.inner_dim();
        let x_embedder = first
            .then(|| -> candle_core::Result<_> {
                let l = gemm_linear(cfg.in_channels, dim, vb.pp("x_embedder"))?;
                Ok(PackedEmbed {
                    weight: l.weight().clone(),
                    bias: l.bias().expect("linear with bias").clone(),
                })
            })
            .transpose()?;
        let blocks = layers
            .clone()
            .map(|i| {
                Ok(if i < cfg.num_layers {
                    let name = "transformer_blocks";
                    FluxBlock::Double(Box::new(DoubleBlock::new(
                        cfg,
                        vb.pp(name).pp(i),
                        tp,
                        &split.pp(name).pp(i),
                    )?))
                } else {
                    let (name, j) = ("single_transformer_blocks", i - cfg.num_layers);
                    FluxBlock::Single(Box::new(SingleBlock::new(
                        cfg,
                        vb.pp(name).pp(j),
                        tp,
                        &split.pp(name).pp(j),
                    )?))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer = last
            .then(|| -> candle_core::Result<_> {
                Ok((
                    AdaLayerNormContinuous::new(
                        dim,
                        dim,
                        false,
                        NORM_EPS,
                        true,
                        vb.pp("norm_out"),
                    )?,
                    gemm_linear(
                        dim,
                        cfg.patch_size * cfg.patch_size * cfg.out_channels(),
                        vb.pp("proj_out"),
                    )?,
                ))
            })
            .transpose()?;
        let tte = vb.pp("time_text_embed");
        let time_text_embed = if cfg.guidance_embeds {
            TimeTextEmbed::Guidance(CombinedTimestepGuidanceTextProjEmbeddings::new(
                dim,
                cfg.pooled_projection_dim,
                tte,
            )?)
        } else {
            TimeTextEmbed::Plain(CombinedTimestepTextProjEmbeddings::new(
                dim,
                cfg.pooled_projection_dim,
                tte,
            )?)
        };
        let per_token = PACKING * PACKING;
        let info = BackboneInfo {
            class_name: CLASS_NAME,
            num_layers: cfg.total_layers(),
            num_attention_heads: cfg.num_attention_heads,
            attention_head_dim: cfg.attention_head_dim,
            in_channels: cfg.in_channels / per_token,
            out_channels: cfg.out_channels() / per_token,
            patch_size: PACKING,
            sample_size: DEFAULT_SAMPLE_SIZE,
            caption_channels: cfg.joint_attention_dim,
            updates_text_stream: true,
        };
        Ok(Self {
            info,
            config: cfg.clone(),
            x_embedder,
            time_text_embed,
            context_embedder: gemm_linear(cfg.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            context_cache: Mutex::new(Vec::new()),
            rope_cache: Mutex::new(None),
            blocks,
            layers,
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

    /// Bytes of the split layers' weights (attention, feed-forward and MLP of the blocks
    /// held) that this instance keeps: 1/T of the whole model's, except the row-parallel
    /// biases, which every rank holds whole.
    pub fn split_parameter_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| match b {
                FluxBlock::Double(b) => b.split_parameter_bytes() as u64,
                FluxBlock::Single(b) => b.split_parameter_bytes() as u64,
            })
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

    fn patch_embedding(&self) -> Result<&PackedEmbed> {
        self.x_embedder
            .as_ref()
            .ok_or_else(|| common::no_patch_embedding(CLASS_NAME, &self.layers))
    }

    /// `context_embedder` of the (B, L, joint_attention_dim) text, from the cache when this
    /// tensor was seen.
    fn embed_context(&self, text: &Tensor) -> Result<Tensor> {
        let id = text.id();
        let mut cache = self.context_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = cache.iter().find(|(i, _)| *i == id) {
            return Ok(t.clone());
        }
        let out = linear_forward(&text.to_dtype(self.dtype)?, &self.context_embedder)?;
        if cache.len() == CONTEXT_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((id, out.clone()));
        Ok(out)
    }

    /// The rotary tables of the image tokens a forward holds: the packed rows `rows` of a
    /// grid `cols` wide, row-major, then padding (id 0) up to `len` tokens.
    fn rope_tables(
        &self,
        rows: Range<usize>,
        cols: usize,
        len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let key = (rows.clone(), cols, len);
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, cos, sin)) = cache.as_ref() {
            if *k == key && cos.device().same_device(device) {
                return Ok((cos.clone(), sin.clone()));
            }
        }
        let axes = self.config.axes_dims_rope.len();
        let mut ids = vec![0f64; len * axes];
        // `_prepare_latent_image_ids`: (0, row, col); axes past the third stay 0.
        for (t, (r, c)) in rows
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .take(len)
            .enumerate()
        {
            if axes > 1 {
                ids[t * axes + 1] = r as f64;
            }
            if axes > 2 {
                ids[t * axes + 2] = c as f64;
            }
        }
        let (cos, sin) =
            multi_axis_rotary_tables(&ids, &self.config.axes_dims_rope, ROPE_THETA, device)?;
        *cache = Some((key, cos.clone(), sin.clone()));
        Ok((cos, sin))
    }

    /// A (B,) value on diffusers' forward scale, multiplied by 1000 in the model dtype.
    fn scaled(&self, t: &Tensor, batch: usize) -> Result<Tensor> {
        let t = common::batch_timesteps(t, batch)?.to_dtype(self.dtype)?;
        Ok((t * 1000.0)?)
    }

    /// The scheduler's (B,) timesteps as diffusers' Flux transformer sees them: divided by
    /// 1000 in f32 (FluxPipeline's `timestep / 1000`, a true division as torch's), then
    /// multiplied by 1000 in the model dtype.
    fn scaled_timestep(&self, t: &Tensor, batch: usize) -> Result<Tensor> {
        let t = common::batch_timesteps(t, batch)?.to_dtype(DType::F32)?;
        let thousand = Tensor::full(1000f32, t.dims(), t.device())?;
        self.scaled(&t.div(&thousand)?, batch)
    }

    /// The conditioning part of `embed`: `temb`, the text stream and the rotary tables,
    /// around the image tokens `hidden` of a `grid`.
    fn conditioned_state(
        &self,
        inputs: &BackboneInputs,
        hidden: Tensor,
        grid: (usize, usize),
        ctx: &ForwardContext,
    ) -> Result<BlockState> {
        let batch = inputs.hidden_states.dim(0)?;
        let timestep = self.scaled_timestep(inputs.timestep, batch)?;
        let cond = inputs.conditioning;

        let pooled = cond.require(names::POOLED_PROJECTIONS, CLASS_NAME)?;
        let pooled_dim = self.config.pooled_projection_dim;
        if pooled.dims() != [batch, pooled_dim] {
            return Err(Error::invalid(format!(
                "{CLASS_NAME}: pooled_projections {:?} should be (batch {batch}, \
                 pooled_projection_dim {pooled_dim})",
                pooled.dims()
            )));
        }
        let pooled = pooled.to_dtype(self.dtype)?;
        let temb = match &self.time_text_embed {
            TimeTextEmbed::Plain(e) => e.forward(&timestep, &pooled)?,
            TimeTextEmbed::Guidance(e) => {
                let guidance = cond.require(names::GUIDANCE, CLASS_NAME)?;
                let guidance = self.scaled(guidance, batch).map_err(|e| {
                    Error::invalid(format!("{CLASS_NAME}: conditioning `guidance`: {e}"))
                })?;
                e.forward(&timestep, &guidance, &pooled)?
            }
        };

        let text = cond.require(names::ENCODER_HIDDEN_STATES, CLASS_NAME)?;
        let text_dim = self.config.joint_attention_dim;
        match text.dims() {
            [b, _, d] if *b == batch && *d == text_dim => {}
            dims => {
                return Err(Error::invalid(format!(
                    "{CLASS_NAME}: encoder_hidden_states {dims:?} should be (batch {batch}, L, \
                     joint_attention_dim {text_dim})"
                )))
            }
        }
        let encoder = self.embed_context(text)?;

        let (rows, len) = match &ctx.sp {
            Some(sp) => (sp.slice().token_rows.clone(), sp.padded_len()),
            None => (0..grid.0, grid.0 * grid.1),
        };
        let (cos, sin) = self.rope_tables(rows, grid.1, len, inputs.hidden_states.device())?;

        Ok(BlockState {
            hidden,
            encoder: Some(encoder),
            encoder_bias: None,
            conditioning: Conditioning::new()
                .with(TEMB, temb)
                .with(ROPE_COS, cos)
                .with(ROPE_SIN, sin),
            grid,
        })
    }
}

impl Backbone for FluxTransformer2DModel {
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
        self.conditioned_state(inputs, hidden, grid, ctx)
    }

    fn embed_conditioning(
        &self,
        inputs: &BackboneInputs,
        ctx: &ForwardContext,
    ) -> Result<BlockState> {
        let (hidden, grid) =
            common::no_image_tokens(inputs.hidden_states, ctx, &self.info, self.dtype)?;
        self.conditioned_state(inputs, hidden, grid, ctx)
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
        let blocks =
            common::held_blocks(&self.blocks, &layers, &self.layers, self.info.num_layers)?;
        if blocks.is_empty() {
            return Ok(state);
        }
        let processor = common::block_processor(ctx)?;
        self.tp.check_group(ctx.tp.as_ref(), CLASS_NAME)?;
        let tp = ctx.tp.as_ref().filter(|_| !self.tp.is_serial());
        let temb_silu = state.conditioning(TEMB)?.silu()?;
        let rope = Rope::of(&state)?;
        for (layer, block) in layers.zip(blocks) {
            let encoder = state.text(CLASS_NAME)?;
            let (hidden, encoder) = match block {
                FluxBlock::Double(b) => b.forward(
                    &state.hidden,
                    encoder,
                    &temb_silu,
                    &rope,
                    layer,
                    processor,
                    tp,
                )?,
                FluxBlock::Single(b) => b.forward(
                    &state.hidden,
                    encoder,
                    &temb_silu,
                    &rope,
                    layer,
                    processor,
                    tp,
                )?,
            };
            state.hidden = hidden;
            state.encoder = Some(encoder);
        }
        Ok(state)
    }

    fn modulated_input(&self, state: &BlockState, _ctx: &ForwardContext) -> Result<Option<Tensor>> {
        let first = common::held_blocks(&self.blocks, &(0..1), &self.layers, self.info.num_layers)?;
        let temb_silu = state.conditioning(TEMB)?.silu()?;
        let (norm, chunks, dim) = match &first[0] {
            FluxBlock::Double(b) => (&b.norm1, 6, b.dim),
            FluxBlock::Single(b) => (&b.norm, 3, b.dim),
        };
        let m = common::modulation_chunks(&norm.forward(&temb_silu)?, chunks, dim)?;
        Ok(Some(common::norm_modulate(&state.hidden, &m[0], &m[1])?))
    }

    fn teacache_coefficients(&self) -> Option<&'static [f64]> {
        Some(&TEACACHE_COEFFICIENTS)
    }

    fn head(&self, state: BlockState, ctx: &ForwardContext) -> Result<Tensor> {
        common::check_head_tokens(&state, ctx)?;
        let (norm_out, proj_out) = self
            .final_layer
            .as_ref()
            .ok_or_else(|| common::no_final_layer(CLASS_NAME, &self.layers))?;
        let hidden = norm_out.forward(&state.hidden, state.conditioning(TEMB)?)?;
        let hidden = linear_forward(&hidden, proj_out)?;
        let hidden = common::gather_sp_tokens(hidden, ctx)?;
        Ok(unpack(&hidden, state.grid, self.info.out_channels)?)
    }
}

fn load_backbone(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backbone>> {
    Ok(Box::new(FluxTransformer2DModel::load(dir, options)?))
}

xfuser_core::inventory::submit! {
    TransformerEntry {
        class_name: CLASS_NAME,
        load: load_backbone,
        shape: common::config_shape::<Config>,
        tensor_parallel: true,
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
        assert_eq!(cfg.inner_dim(), 3072);
        assert_eq!(cfg.out_channels(), 64);
        assert_eq!(cfg.total_layers(), 57);
        assert_eq!(cfg.axes_dims_rope, [16, 56, 56]);
        assert!(!cfg.guidance_embeds);
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.shape().num_layers, 57);
    }

    #[test]
    fn unsupported_configs_name_the_field() {
        let bad = [
            (r#"{"patch_size": 2}"#, "patch_size", "2"),
            (r#"{"in_channels": 62}"#, "in_channels", "62"),
            (r#"{"out_channels": 6}"#, "out_channels", "6"),
            (
                r#"{"axes_dims_rope": [16, 56, 48]}"#,
                "axes_dims_rope",
                "128",
            ),
            (
                r#"{"axes_dims_rope": [3, 3], "attention_head_dim": 6}"#,
                "axes_dims_rope",
                "[3, 3]",
            ),
            (
                r#"{"num_layers": 0, "num_single_layers": 0}"#,
                "num_layers",
                "0",
            ),
        ];
        for (json, field, value) in bad {
            let p = parse(json).validate().unwrap_err();
            assert_eq!(p.field, field, "{json}");
            assert!(p.message.contains(value), "{json}: {}", p.message);
        }
    }

    #[test]
    fn packing_round_trips() {
        // unpack inverts the packing of forward_rows (identity x_embedder).
        let (b, c, h, w) = (1, 3, 4, 6);
        let latent = Tensor::arange(0f32, (b * c * h * w) as f32, &Device::Cpu).unwrap();
        let latent = latent.reshape((b, c, h, w)).unwrap();
        let embed = PackedEmbed {
            weight: Tensor::eye(c * 4, DType::F32, &Device::Cpu).unwrap(),
            bias: Tensor::zeros(c * 4, DType::F32, &Device::Cpu).unwrap(),
        };
        let tokens = embed.forward_rows(&latent, 0..h / 2).unwrap();
        assert_eq!(tokens.dims(), [b, (h / 2) * (w / 2), c * 4]);
        // Token (0, 0) holds channel 0's 2×2 block first: pixels (0,0), (0,1), (1,0), (1,1).
        let first: Vec<f32> = tokens.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(&first[..4], &[0.0, 1.0, 6.0, 7.0]);
        let back = unpack(&tokens, (h / 2, w / 2), c).unwrap();
        let diff: f32 = (back - &latent)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0);
        // The rows of the second token row only.
        let part = embed.forward_rows(&latent, 1..2).unwrap();
        let whole_rows = tokens.narrow(1, w / 2, w / 2).unwrap();
        let diff: f32 = (part - whole_rows)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}
