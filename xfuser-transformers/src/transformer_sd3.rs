//! Stable Diffusion 3 / 3.5 diffusion transformer (MMDiT), a port of diffusers'
//! `models/transformers/transformer_sd3.py` (`SD3Transformer2DModel`, with
//! `JointTransformerBlock` from `models/attention.py` and `JointAttnProcessor2_0`).
//!
//! Paper: Esser et al., *Scaling Rectified Flow Transformers for High-Resolution Image
//! Synthesis* <https://arxiv.org/abs/2403.03206>.
//!
//! The image tokens and the text tokens keep separate weights but attend to each other in one
//! joint attention per block; both streams are updated by every block but the last, which is
//! `context_pre_only` (its text norm is an `AdaLayerNormContinuous`, it has no `to_add_out`
//! and no `ff_context`, and the text stream ends there). SD3.5 adds RMS query/key norms
//! (`qk_norm = "rms_norm"`) and, in the blocks of `dual_attention_layers`, a second
//! self-attention `attn2` over the image tokens with its own modulation
//! (`SD35AdaLayerNormZeroX`, nine chunks).
//!
//! The forward is split as the [`Backbone`] contract asks: `embed` (patch embedding with the
//! centre-cropped sin-cos position embedding, the timestep + pooled-text embedding `temb`,
//! the context embedder), `blocks` (joint attention through the context's attention
//! processor; `attn2` through its `self_attention` as site `num_layers + block`) and `head`
//! (`norm_out` modulated by `temb`, `proj_out`, unpatchify). Module and tensor names are
//! diffusers' state-dict names.
//!
//! Sequence parallelism (a [`ForwardContext`] with `sp`): every sp rank takes the whole latent,
//! `embed` patch-embeds only its own token rows (with their rows of the cropped position
//! embedding) padded to the split's common length, the text stream stays whole, the joint
//! attention goes through the context's processor (which returns the whole text output), and
//! `head` projects the local tokens, all-gathers them over the sp group, drops the padding and
//! unpatchifies, so every sp rank returns the whole output.
//!
//! PipeFusion stages ([`LoadOptions::stage`]): a stage loads only its blocks, the patch
//! embedding on the first stage and `norm_out` / `proj_out` on the last; every stage loads the
//! small conditioning modules (`time_text_embed`, `context_embedder`). The blocks update the
//! text stream ([`BackboneInfo::updates_text_stream`]), so the runtime passes it from stage to
//! stage with the image tokens; [`Backbone::embed_conditioning`] embeds it anyway, and the
//! runtime replaces it with the one received.

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
use xfuser_layers::embeddings::{get_2d_sincos_pos_embed, CombinedTimestepTextProjEmbeddings};
use xfuser_layers::feed_forward::{FeedForwardActivation, ParallelFeedForward};
use xfuser_layers::normalization::{AdaLayerNormContinuous, RmsNorm};
use xfuser_layers::tensor_parallel::{ColumnParallelLinear, RowParallelLinear, SplitWeights};

pub use crate::backbone_common::ConfigProblem;
use crate::backbone_common::{self as common, ModelConfig, PatchRows, StageLayers};

pub const CLASS_NAME: &str = "SD3Transformer2DModel";

/// The block state's model-own tensor: (B, D) `temb`, the timestep embedding plus the
/// projected pooled text, which every block's adaLN and the head's `norm_out` read.
pub const TEMB: &str = "temb";

/// Epsilon of every LayerNorm and RMSNorm of the model.
const NORM_EPS: f64 = 1e-6;

/// `config.json` of an SD3 transformer, field for field with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Config {
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of `encoder_hidden_states` (CLIP-L + CLIP-G padded, joined with T5).
    #[serde(default = "default_joint_attention_dim")]
    pub joint_attention_dim: usize,
    /// Width of the text stream after `context_embedder`; the blocks need it to be the hidden
    /// size.
    #[serde(default = "default_caption_projection_dim")]
    pub caption_projection_dim: usize,
    #[serde(default = "default_pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    /// Absent: 16; null: `in_channels`.
    #[serde(default = "default_out_channels")]
    pub out_channels: Option<usize>,
    /// Side of the square table of position embeddings that is centre-cropped to each latent's
    /// patch grid; null: a sin-cos embedding of the grid itself.
    #[serde(default = "default_pos_embed_max_size")]
    pub pos_embed_max_size: Option<usize>,
    /// Blocks with SD3.5's second self-attention (indices past the last block are ignored,
    /// as diffusers ignores them).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// null or `"rms_norm"`.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn default_sample_size() -> usize {
    128
}
fn default_patch_size() -> usize {
    2
}
fn default_in_channels() -> usize {
    16
}
fn default_num_layers() -> usize {
    18
}
fn default_attention_head_dim() -> usize {
    64
}
fn default_num_attention_heads() -> usize {
    18
}
fn default_joint_attention_dim() -> usize {
    4096
}
fn default_caption_projection_dim() -> usize {
    1152
}
fn default_pooled_projection_dim() -> usize {
    2048
}
fn default_out_channels() -> Option<usize> {
    Some(16)
}
fn default_pos_embed_max_size() -> Option<usize> {
    Some(96)
}

impl Config {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Whether block `layer` has the dual (second) self-attention.
    pub fn uses_dual_attention(&self, layer: usize) -> bool {
        self.dual_attention_layers.contains(&layer)
    }

    /// Whether the attention layers normalize queries and keys (RMSNorm).
    pub fn uses_qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    /// Checks that the model described can be built and run; names the first bad field.
    pub fn validate(&self) -> std::result::Result<(), ConfigProblem> {
        let problem = |field, message: String| Err(ConfigProblem { field, message });
        if let Some(norm) = self.qk_norm.as_deref().filter(|n| *n != "rms_norm") {
            return problem(
                "qk_norm",
                format!("`{norm}` is not supported by {CLASS_NAME}; only null or `rms_norm`"),
            );
        }
        common::check_attention_heads(self.num_attention_heads, self.attention_head_dim)?;
        if self.num_layers == 0 {
            return problem("num_layers", "0: the model needs at least one block".into());
        }
        let inner = self.inner_dim();
        common::check_sincos_width(inner)?;
        if self.caption_projection_dim != inner {
            return problem(
                "caption_projection_dim",
                format!(
                    "{} differs from the hidden size {inner} (num_attention_heads × \
                     attention_head_dim) that the joint blocks read the text stream in",
                    self.caption_projection_dim
                ),
            );
        }
        common::check_patch_size(self.patch_size, self.sample_size)?;
        if self.pos_embed_max_size == Some(0) {
            return problem(
                "pos_embed_max_size",
                "0: the position table needs at least one patch (or null for none)".into(),
            );
        }
        common::check_channels(self.in_channels, self.out_channels())?;
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
            num_layers: self.num_layers,
        }
    }
}

/// diffusers' `PatchEmbed` as SD3 configures it: a stride-p convolution applied as one matrix
/// product over flattened patches, plus the position embedding of the latent's patch grid,
/// centre-cropped from the `pos_embed_max_size`² table (`pos_embed.pos_embed`) or, without a
/// table size, the sin-cos embedding of the grid itself.
#[derive(Debug)]
struct PatchEmbed {
    /// (D, C·p·p): the convolution kernel, flattened, stored as [`kernels::gemm_friendly_weight`].
    weight: Tensor,
    bias: Tensor,
    patch_size: usize,
    embed_dim: usize,
    /// (max, max, D) table, or None to compute the grid's own sin-cos embedding.
    table: Option<Tensor>,
    base_size: usize,
    /// The position embedding of the last grid seen: latents keep their size across steps.
    pos_cache: Mutex<Option<((usize, usize), Tensor)>>,
}

impl PatchEmbed {
    fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (p, c, dim) = (cfg.patch_size, cfg.in_channels, cfg.inner_dim());
        let proj = vb.pp("proj");
        let weight = proj
            .get((dim, c, p, p), "weight")?
            .reshape((dim, c * p * p))?;
        let base_size = cfg.sample_size / p;
        let table = match cfg.pos_embed_max_size {
            None => None,
            Some(max) => {
                // The checkpoint's table when it has one (diffusers saves it); otherwise the
                // table diffusers computes at construction.
                let table = if vb.contains_tensor("pos_embed") {
                    vb.get((1, max * max, dim), "pos_embed")?
                } else {
                    get_2d_sincos_pos_embed(dim, (max, max), base_size, 1.0, vb.device())?
                        .to_dtype(vb.dtype())?
                };
                Some(table.reshape((max, max, dim))?)
            }
        };
        Ok(Self {
            weight: kernels::gemm_friendly_weight(&weight)?,
            bias: proj.get(dim, "bias")?,
            patch_size: p,
            embed_dim: dim,
            table,
            base_size,
            pos_cache: Mutex::new(None),
        })
    }

    /// The position embedding of a `(rows, cols)` patch grid, (rows·cols, D).
    fn pos_embed(&self, grid: (usize, usize), device: &Device) -> Result<Tensor> {
        let mut cache = self.pos_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, t)) = cache.as_ref() {
            if *g == grid && t.device().same_device(device) {
                return Ok(t.clone());
            }
        }
        let (rows, cols) = grid;
        let pos = match &self.table {
            Some(table) => {
                let max = table.dim(0)?;
                for (what, n) in [("height", rows), ("width", cols)] {
                    if n > max {
                        return Err(Error::invalid(format!(
                            "{CLASS_NAME}: the latent's {what} of {n} patches is more than the \
                             pos_embed_max_size of {max} patches the model has position \
                             embeddings for"
                        )));
                    }
                }
                let (top, left) = ((max - rows) / 2, (max - cols) / 2);
                table
                    .narrow(0, top, rows)?
                    .narrow(1, left, cols)?
                    .contiguous()?
                    .reshape((rows * cols, self.embed_dim))?
            }
            None => get_2d_sincos_pos_embed(self.embed_dim, grid, self.base_size, 1.0, device)?,
        };
        *cache = Some((grid, pos.clone()));
        Ok(pos)
    }
}

impl PatchRows for PatchEmbed {
    /// The tokens of the patch rows `rows` of a (B, C, H, W) latent, with their rows of the
    /// latent's position embedding: (B, rows.len()·(W/p), D).
    fn forward_rows(&self, latent: &Tensor, rows: Range<usize>) -> Result<Tensor> {
        let (b, c, h, w) = latent.dims4()?;
        let p = self.patch_size;
        let (grid_rows, cols) = (h / p, w / p);
        let n = rows.len();
        let part = if n == grid_rows {
            latent.clone()
        } else {
            latent.narrow(2, rows.start * p, n * p)?
        };
        // (B, C, n·p, W) -> (B, n·cols, C·p·p), the order of the convolution kernel.
        let patches = part
            .reshape((b, c, n, p, cols, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, n * cols, c * p * p))?;
        let tokens = kernels::matmul_t(&patches, &self.weight)?.broadcast_add(&self.bias)?;
        let pos = self.pos_embed((grid_rows, cols), latent.device())?.narrow(
            0,
            rows.start * cols,
            n * cols,
        )?;
        let dtype = tokens.dtype();
        Ok(tokens
            .to_dtype(DType::F32)?
            .broadcast_add(&pos.to_dtype(DType::F32)?)?
            .to_dtype(dtype)?)
    }

    /// The grid must fit in the position table.
    fn check_grid(&self, grid: (usize, usize), device: &Device) -> Result<()> {
        self.pos_embed(grid, device).map(|_| ())
    }
}

/// The q, k, v projections of one token stream, fused into one matrix product, with their
/// optional RMS norms of q and k. Under tensor parallelism each projection is column-parallel:
/// this rank's heads only (the per-head norms are whole).
#[derive(Debug)]
struct QkvProjection {
    /// [q; k; v] (3·inner/T, D) and their biases.
    weight: Tensor,
    bias: Option<Tensor>,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    /// Bytes of the split weights kept.
    split_bytes: usize,
}

impl QkvProjection {
    /// `names` are the q, k, v projection modules (shard `tp` of each, from `split`) and the
    /// q, k norms (whole, from `vb`).
    #[allow(clippy::too_many_arguments)]
    fn new(
        dim: usize,
        inner: usize,
        head_dim: usize,
        qk_norm: bool,
        names: [&str; 5],
        vb: &VarBuilder,
        tp: TpRank,
        split: &SplitWeights,
    ) -> Result<Self> {
        let proj = |name: &str| ColumnParallelLinear::load(dim, inner, true, tp, &split.pp(name));
        let (q, k, v) = (proj(names[0])?, proj(names[1])?, proj(names[2])?);
        let split_bytes = [&q, &k, &v].iter().map(|l| l.parameter_bytes()).sum();
        let (weight, bias) = common::fuse_columns(&[&q, &k, &v])?;
        let norm = |name: &str| -> candle_core::Result<Option<RmsNorm>> {
            qk_norm
                .then(|| RmsNorm::new(head_dim, NORM_EPS, true, vb.pp(name)))
                .transpose()
        };
        Ok(Self {
            weight,
            bias,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
            split_bytes,
        })
    }

    /// (B, S, D) -> q, k, v (B, H, S, Dh), q and k normalized.
    fn forward(&self, xs: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let mut parts = kernels::split_heads(
            &kernels::matmul_t(xs, &self.weight)?,
            self.bias.as_ref(),
            3,
            heads,
        )?;
        let v = parts.pop().expect("three parts");
        let k = parts.pop().expect("three parts");
        let q = parts.pop().expect("three parts");
        let norm = |n: &Option<RmsNorm>, t: Tensor| -> Result<Tensor> {
            Ok(match n {
                Some(n) => n.forward(&t)?,
                None => t,
            })
        };
        Ok((norm(&self.norm_q, q)?, norm(&self.norm_k, k)?, v))
    }
}

/// diffusers' `Attention` as SD3 builds it: the image projections (`to_q`, `to_k`, `to_v`,
/// `norm_q`, `norm_k`, `to_out.0`) and, for the joint attention `attn`, the text projections
/// (`add_q_proj`, `add_k_proj`, `add_v_proj`, `norm_added_q`, `norm_added_k`, and `to_add_out`
/// except in the `context_pre_only` block). Outputs are returned without the biases of the
/// output projections, which the callers add in a fused residual. Under tensor parallelism
/// the projections in are column-parallel (this rank's H/T heads) and the projections out
/// row-parallel: the outputs are this rank's partial sums, to be all-reduced.
#[derive(Debug)]
struct Attention {
    image: QkvProjection,
    to_out: RowParallelLinear,
    /// The text side of a joint attention, and its output projection.
    text: Option<(QkvProjection, Option<RowParallelLinear>)>,
    /// The heads this rank computes.
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(
        cfg: &Config,
        joint: bool,
        context_pre_only: bool,
        vb: VarBuilder,
        tp: TpRank,
        split: &SplitWeights,
    ) -> Result<Self> {
        let (dim, heads, head_dim) = (
            cfg.inner_dim(),
            cfg.num_attention_heads,
            cfg.attention_head_dim,
        );
        let qk_norm = cfg.uses_qk_norm();
        let image = QkvProjection::new(
            dim,
            dim,
            head_dim,
            qk_norm,
            ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            &vb,
            tp,
            split,
        )?;
        let to_out = RowParallelLinear::load(dim, dim, true, tp, &split.pp("to_out.0"))?;
        let text = joint
            .then(|| -> Result<_> {
                let proj = QkvProjection::new(
                    dim,
                    dim,
                    head_dim,
                    qk_norm,
                    [
                        "add_q_proj",
                        "add_k_proj",
                        "add_v_proj",
                        "norm_added_q",
                        "norm_added_k",
                    ],
                    &vb,
                    tp,
                    split,
                )?;
                let out = (!context_pre_only)
                    .then(|| RowParallelLinear::load(dim, dim, true, tp, &split.pp("to_add_out")))
                    .transpose()?;
                Ok((proj, out))
            })
            .transpose()?;
        Ok(Self {
            image,
            to_out,
            text,
            heads: heads / tp.size,
            head_dim,
        })
    }

    /// Bytes of the split weights this rank keeps.
    fn split_parameter_bytes(&self) -> usize {
        let text = self.text.as_ref().map_or(0, |(proj, out)| {
            proj.split_bytes + out.as_ref().map_or(0, |o| o.parameter_bytes())
        });
        self.image.split_bytes + self.to_out.parameter_bytes() + text
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// (B, H, S, Dh) -> (B, S, H·Dh).
    fn merge_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, s, _) = xs.dims4()?;
        xs.transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, self.heads * self.head_dim))
    }

    /// Self-attention over the image tokens `xs` (B, N, D) (SD3.5's `attn2`), through the
    /// processor as site `site`; the output without to_out's bias.
    fn self_attention(
        &self,
        xs: &Tensor,
        site: usize,
        processor: &dyn AttentionProcessor,
    ) -> Result<Tensor> {
        let (q, k, v) = self.image.forward(xs, self.heads)?;
        let out = if processor.name() == SerialAttention.name() {
            // The serial processor's math, fused, with the heads merged on the way.
            kernels::attention_merged(&q, &k, &v, None, self.scale())?
        } else {
            let out = processor.self_attention(site, &q, &k, &v, self.scale())?;
            self.merge_heads(&out)?
        };
        self.to_out.forward_partial(&out)
    }

    /// Joint attention of the image tokens `xs` (B, N, D) and the text `context` (B, L, D),
    /// through the processor as site `layer`: the image output and, unless this is the
    /// `context_pre_only` block, the text output, both without their output biases.
    fn joint_attention(
        &self,
        xs: &Tensor,
        context: &Tensor,
        layer: usize,
        processor: &dyn AttentionProcessor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (text_proj, to_add_out) = self
            .text
            .as_ref()
            .expect("a joint attention has text projections");
        let (q, k, v) = self.image.forward(xs, self.heads)?;
        let (tq, tk, tv) = text_proj.forward(context, self.heads)?;
        let scale = self.scale();
        let (image, text) = if processor.name() == SerialAttention.name() {
            // One softmax over image and text keys (image first, as diffusers joins them),
            // fused, with the heads merged on the way.
            let join = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 2);
            let (k, v) = (join(&k, &tk)?, join(&v, &tv)?);
            if to_add_out.is_none() {
                // The text output is dropped: only the image queries are needed.
                (kernels::attention_merged(&q, &k, &v, None, scale)?, None)
            } else {
                let n = q.dim(2)?;
                let out = kernels::attention_merged(&join(&q, &tq)?, &k, &v, None, scale)?;
                let l = out.dim(1)? - n;
                (out.narrow(1, 0, n)?, Some(out.narrow(1, n, l)?))
            }
        } else {
            let text = JointText {
                q: &tq,
                k: &tk,
                v: &tv,
            };
            let (image, text) = processor.joint_attention(layer, &q, &k, &v, text, scale)?;
            let text = match to_add_out {
                Some(_) => Some(self.merge_heads(&text)?),
                None => None,
            };
            (self.merge_heads(&image)?, text)
        };
        let image = self.to_out.forward_partial(&image)?;
        let text = match (to_add_out, text) {
            (Some(out), Some(t)) => Some(out.forward_partial(&t)?),
            _ => None,
        };
        Ok((image, text))
    }

    fn out_bias(&self) -> Option<&Tensor> {
        self.to_out.bias()
    }

    fn add_out_bias(&self) -> Option<&Tensor> {
        self.text
            .as_ref()
            .and_then(|(_, out)| out.as_ref())
            .and_then(|l| l.bias())
    }
}

/// The modulation of the text stream in a block: adaLN-zero (six chunks) in every block but
/// the last, whose text output is dropped (`AdaLayerNormContinuous`).
#[derive(Debug)]
enum ContextNorm {
    Zero(Linear),
    Continuous(AdaLayerNormContinuous),
}

/// diffusers' `JointTransformerBlock`.
#[derive(Debug)]
struct JointTransformerBlock {
    /// adaLN-zero of the image tokens: D -> 6·D, or 9·D with the dual attention
    /// (`SD35AdaLayerNormZeroX`).
    norm1: Linear,
    norm1_context: ContextNorm,
    attn: Attention,
    attn2: Option<Attention>,
    ff: ParallelFeedForward,
    /// None in the `context_pre_only` block.
    ff_context: Option<ParallelFeedForward>,
    dim: usize,
}

impl JointTransformerBlock {
    /// Shard `tp` of block `layer`: attention and feed-forward layers from `split`, the rest
    /// whole from `vb`.
    fn new(
        cfg: &Config,
        layer: usize,
        vb: VarBuilder,
        tp: TpRank,
        split: &SplitWeights,
    ) -> Result<Self> {
        let dim = cfg.inner_dim();
        let context_pre_only = layer + 1 == cfg.num_layers;
        let dual = cfg.uses_dual_attention(layer);
        let adaln = |chunks: usize, name: &str| -> candle_core::Result<Linear> {
            kernels::gemm_friendly_linear(&candle_nn::linear(
                dim,
                chunks * dim,
                vb.pp(name).pp("linear"),
            )?)
        };
        let norm1_context = if context_pre_only {
            ContextNorm::Continuous(AdaLayerNormContinuous::new(
                dim,
                dim,
                false,
                NORM_EPS,
                true,
                vb.pp("norm1_context"),
            )?)
        } else {
            ContextNorm::Zero(adaln(6, "norm1_context")?)
        };
        let ff = |name: &str| {
            ParallelFeedForward::load(
                dim,
                4 * dim,
                FeedForwardActivation::GeluTanh,
                tp,
                &split.pp(name),
            )
        };
        Ok(Self {
            norm1: adaln(if dual { 9 } else { 6 }, "norm1")?,
            norm1_context,
            attn: Attention::new(
                cfg,
                true,
                context_pre_only,
                vb.pp("attn"),
                tp,
                &split.pp("attn"),
            )?,
            attn2: dual
                .then(|| Attention::new(cfg, false, false, vb.pp("attn2"), tp, &split.pp("attn2")))
                .transpose()?,
            ff: ff("ff")?,
            ff_context: (!context_pre_only).then(|| ff("ff_context")).transpose()?,
            dim,
        })
    }

    /// Bytes of the split layers' weights this rank keeps.
    fn split_parameter_bytes(&self) -> usize {
        self.attn.split_parameter_bytes()
            + self.attn2.as_ref().map_or(0, |a| a.split_parameter_bytes())
            + self.ff.parameter_bytes()
            + self.ff_context.as_ref().map_or(0, |f| f.parameter_bytes())
    }

    /// The image stream's attention input: `norm1` of `hidden` with the first shift and scale.
    fn modulated_input(&self, hidden: &Tensor, temb_silu: &Tensor) -> Result<Tensor> {
        let chunks = if self.attn2.is_some() { 9 } else { 6 };
        let m = common::modulation_chunks(&self.norm1.forward(temb_silu)?, chunks, self.dim)?;
        Ok(common::norm_modulate(hidden, &m[0], &m[1])?)
    }

    /// (image (B, N, D), text (B, L, D)) -> (image, text; None after the last block).
    /// `temb` is the (B, D) conditioning and `temb_silu` its SiLU; `layer` and `attn2_site`
    /// name the attention sites; `tp` is the group the split layers' partial outputs are
    /// all-reduced over (None: whole layers).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        hidden: &Tensor,
        encoder: &Tensor,
        temb: &Tensor,
        temb_silu: &Tensor,
        layer: usize,
        attn2_site: usize,
        processor: &dyn AttentionProcessor,
        tp: Option<&ProcessGroup>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dim = self.dim;
        let chunks = if self.attn2.is_some() { 9 } else { 6 };
        let m = common::modulation_chunks(&self.norm1.forward(temb_silu)?, chunks, dim)?;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2,
        // scale_msa2, gate_msa2]
        let normed = common::norm_modulate(hidden, &m[0], &m[1])?;
        let (normed_context, context_mod) = match &self.norm1_context {
            ContextNorm::Zero(linear) => {
                let c = common::modulation_chunks(&linear.forward(temb_silu)?, 6, dim)?;
                (common::norm_modulate(encoder, &c[0], &c[1])?, Some(c))
            }
            ContextNorm::Continuous(norm) => (norm.forward(encoder, temb)?, None),
        };

        // SD3.5's second self-attention reads the block's input, normalized as for the
        // first, modulated with its own shift and scale.
        let normed2 = match &self.attn2 {
            Some(_) => Some(common::norm_modulate(hidden, &m[6], &m[7])?),
            None => None,
        };

        let (attn, context_attn) =
            self.attn
                .joint_attention(&normed, &normed_context, layer, processor)?;
        let attn = common::tp_all_reduce(attn, tp)?;
        let context_attn = context_attn
            .map(|t| common::tp_all_reduce(t, tp))
            .transpose()?;
        let mut hidden = kernels::gated_residual(hidden, Some(&m[2]), &attn, self.attn.out_bias())?;
        if let (Some(attn2), Some(normed2)) = (&self.attn2, normed2) {
            let attn =
                common::tp_all_reduce(attn2.self_attention(&normed2, attn2_site, processor)?, tp)?;
            hidden = kernels::gated_residual(&hidden, Some(&m[8]), &attn, attn2.out_bias())?;
        }
        let normed = common::norm_modulate(&hidden, &m[3], &m[4])?;
        let ff = common::tp_all_reduce(self.ff.forward_partial(&normed)?, tp)?;
        let hidden = kernels::gated_residual(&hidden, Some(&m[5]), &ff, self.ff.out_bias())?;

        let (Some(ff_context), Some(c), Some(context_attn)) =
            (&self.ff_context, context_mod, context_attn)
        else {
            // The last block: the text stream ends here.
            return Ok((hidden, None));
        };
        // c: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp of the text.
        let encoder = kernels::gated_residual(
            encoder,
            Some(&c[2]),
            &context_attn,
            self.attn.add_out_bias(),
        )?;
        let normed = common::norm_modulate(&encoder, &c[3], &c[4])?;
        let ff = common::tp_all_reduce(ff_context.forward_partial(&normed)?, tp)?;
        let encoder = kernels::gated_residual(&encoder, Some(&c[5]), &ff, ff_context.out_bias())?;
        Ok((hidden, Some(encoder)))
    }
}

/// Text tensors whose `context_embedder` output is kept (both CFG halves of two rank threads
/// sharing a model, say).
const CONTEXT_CACHE_ENTRIES: usize = 2;

/// diffusers' `SD3Transformer2DModel`, or one PipeFusion stage of it.
#[derive(Debug)]
pub struct SD3Transformer2DModel {
    info: BackboneInfo,
    config: Config,
    /// None on PipeFusion stages after the first.
    pos_embed: Option<PatchEmbed>,
    time_text_embed: CombinedTimestepTextProjEmbeddings,
    context_embedder: Linear,
    /// The text stream of the last `encoder_hidden_states` seen, by tensor id: the text is
    /// the same tensor at every step of a denoising loop (candle tensors are immutable, so an
    /// id names one content).
    context_cache: Mutex<Vec<(TensorId, Tensor)>>,
    /// The blocks `layers` (all of them unless this is a PipeFusion stage).
    transformer_blocks: Vec<JointTransformerBlock>,
    layers: Range<usize>,
    /// `norm_out` and `proj_out`; None on PipeFusion stages before the last.
    final_layer: Option<(AdaLayerNormContinuous, Linear)>,
    /// Bytes of the weights loaded, when loaded from files.
    parameter_bytes: Option<u64>,
    dtype: DType,
    /// The tensor-parallel shard this instance holds (the whole model: serial).
    tp: TpRank,
}

impl SD3Transformer2DModel {
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

    /// Builds tensor-parallel shard `tp` of the whole model or of a PipeFusion stage: in every
    /// block the attention projections in (`to_q/k/v`, `add_q/k/v_proj`) column-parallel and
    /// out (`to_out.0`, `to_add_out`) row-parallel, for `attn` and SD3.5's `attn2`, and both
    /// feed-forwards (`ff`, `ff_context`: `net.0.proj` column, `net.2` row) read from `split`,
    /// this rank's H/T heads and 4·D/T hidden features; everything else (the q/k norms, the
    /// adaLN modulations, embeddings, final layer) whole from `vb`. The forward then needs the
    /// tp group in its [`ForwardContext::tp`].
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
        let p = cfg.patch_size;
        let out_channels = cfg.out_channels();
        let pos_embed = first
            .then(|| PatchEmbed::new(cfg, vb.pp("pos_embed")))
            .transpose()?;
        let transformer_blocks = layers
            .clone()
            .map(|i| {
                JointTransformerBlock::new(
                    cfg,
                    i,
                    vb.pp("transformer_blocks").pp(i),
                    tp,
                    &split.pp("transformer_blocks").pp(i),
                )
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
                    kernels::gemm_friendly_linear(&candle_nn::linear(
                        dim,
                        p * p * out_channels,
                        vb.pp("proj_out"),
                    )?)?,
                ))
            })
            .transpose()?;
        let info = BackboneInfo {
            class_name: CLASS_NAME,
            num_layers: cfg.num_layers,
            num_attention_heads: cfg.num_attention_heads,
            attention_head_dim: cfg.attention_head_dim,
            in_channels: cfg.in_channels,
            out_channels,
            patch_size: p,
            sample_size: cfg.sample_size,
            caption_channels: cfg.joint_attention_dim,
            updates_text_stream: true,
        };
        Ok(Self {
            info,
            config: cfg.clone(),
            pos_embed,
            time_text_embed: CombinedTimestepTextProjEmbeddings::new(
                dim,
                cfg.pooled_projection_dim,
                vb.pp("time_text_embed"),
            )?,
            context_embedder: kernels::gemm_friendly_linear(&candle_nn::linear(
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                vb.pp("context_embedder"),
            )?)?,
            context_cache: Mutex::new(Vec::new()),
            transformer_blocks,
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

    fn patch_embedding(&self) -> Result<&PatchEmbed> {
        self.pos_embed
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
        let out = kernels::matmul_t(&text.to_dtype(self.dtype)?, self.context_embedder.weight())?;
        let out = match self.context_embedder.bias() {
            Some(b) => out.broadcast_add(b)?,
            None => out,
        };
        if cache.len() == CONTEXT_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((id, out.clone()));
        Ok(out)
    }

    /// The conditioning part of `embed`: `temb` and the text stream, around the image tokens
    /// `hidden` of a `grid`.
    fn conditioned_state(
        &self,
        inputs: &BackboneInputs,
        hidden: Tensor,
        grid: (usize, usize),
    ) -> Result<BlockState> {
        let batch = inputs.hidden_states.dim(0)?;
        let timestep = common::batch_timesteps(inputs.timestep, batch)?;
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
        let temb = self
            .time_text_embed
            .forward(&timestep, &pooled.to_dtype(self.dtype)?)?;

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

        Ok(BlockState {
            hidden,
            encoder: Some(encoder),
            encoder_bias: None,
            conditioning: Conditioning::new().with(TEMB, temb),
            grid,
        })
    }
}

impl Backbone for SD3Transformer2DModel {
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
        if blocks.is_empty() {
            return Ok(state);
        }
        let processor = common::block_processor(ctx)?;
        self.tp.check_group(ctx.tp.as_ref(), CLASS_NAME)?;
        let tp = ctx.tp.as_ref().filter(|_| !self.tp.is_serial());
        let temb = state.conditioning(TEMB)?.clone();
        let temb_silu = temb.silu()?;
        let num_layers = self.info.num_layers;
        for (layer, block) in layers.zip(blocks) {
            let encoder = state.encoder.as_ref().ok_or_else(|| {
                Error::invalid(format!(
                    "{CLASS_NAME}: block {layer} needs the text stream, which the block state \
                     lacks (it ends after the last block, {})",
                    num_layers - 1
                ))
            })?;
            let (hidden, encoder) = block.forward(
                &state.hidden,
                encoder,
                &temb,
                &temb_silu,
                layer,
                num_layers + layer,
                processor,
                tp,
            )?;
            state.hidden = hidden;
            state.encoder = encoder;
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
        let temb_silu = state.conditioning(TEMB)?.silu()?;
        Ok(Some(first[0].modulated_input(&state.hidden, &temb_silu)?))
    }

    fn head(&self, state: BlockState, ctx: &ForwardContext) -> Result<Tensor> {
        common::check_head_tokens(&state, ctx)?;
        let (norm_out, proj_out) = self
            .final_layer
            .as_ref()
            .ok_or_else(|| common::no_final_layer(CLASS_NAME, &self.layers))?;
        let hidden = norm_out.forward(&state.hidden, state.conditioning(TEMB)?)?;
        let hidden = kernels::matmul_t(&hidden, proj_out.weight())?;
        let hidden = match proj_out.bias() {
            Some(b) => hidden.broadcast_add(b)?,
            None => hidden,
        };
        common::gather_and_unpatchify(hidden, state.grid, ctx, &self.info)
    }
}

fn load_backbone(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backbone>> {
    Ok(Box::new(SD3Transformer2DModel::load(dir, options)?))
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
        assert_eq!(cfg.inner_dim(), 1152);
        assert_eq!(cfg.caption_projection_dim, 1152);
        assert_eq!(cfg.out_channels(), 16);
        assert_eq!(cfg.pos_embed_max_size, Some(96));
        assert_eq!(cfg.num_layers, 18);
        assert!(cfg.dual_attention_layers.is_empty() && !cfg.uses_qk_norm());
        assert!(cfg.validate().is_ok());
        let cfg = parse(
            r#"{"out_channels": null, "in_channels": 4, "pos_embed_max_size": null,
                "qk_norm": "rms_norm", "dual_attention_layers": [0, 2]}"#,
        );
        assert_eq!(cfg.out_channels(), 4);
        assert_eq!(cfg.pos_embed_max_size, None);
        assert!(cfg.uses_dual_attention(2) && !cfg.uses_dual_attention(1));
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unsupported_configs_name_the_field() {
        let bad = [
            (r#"{"qk_norm": "layer_norm"}"#, "qk_norm", "layer_norm"),
            (
                r#"{"qk_norm": "rms_norm_across_heads"}"#,
                "qk_norm",
                "rms_norm_across_heads",
            ),
            (
                r#"{"caption_projection_dim": 1536}"#,
                "caption_projection_dim",
                "1536",
            ),
            (r#"{"num_layers": 0}"#, "num_layers", "0"),
            (
                r#"{"num_attention_heads": 1, "attention_head_dim": 6, "caption_projection_dim": 6}"#,
                "attention_head_dim",
                "6",
            ),
            (r#"{"patch_size": 0}"#, "patch_size", "0"),
            (r#"{"pos_embed_max_size": 0}"#, "pos_embed_max_size", "0"),
        ];
        for (json, field, value) in bad {
            let p = parse(json).validate().unwrap_err();
            assert_eq!(p.field, field, "{json}");
            assert!(p.message.contains(value), "{json}: {}", p.message);
        }
    }
}
