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
    PipelineStage, SpContext,
};
use xfuser_core::kernels;
use xfuser_core::registry::{LoadOptions, ModelShape, TransformerEntry};
use xfuser_core::weights::WeightFiles;
use xfuser_core::{Error, Result};
use xfuser_layers::embeddings::{get_2d_sincos_pos_embed, CombinedTimestepTextProjEmbeddings};
use xfuser_layers::feed_forward::{FeedForward, FeedForwardActivation};
use xfuser_layers::normalization::{AdaLayerNormContinuous, RmsNorm};

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

/// A configuration this port cannot run: the offending field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub field: &'static str,
    pub message: String,
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
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return problem(
                "num_attention_heads",
                format!(
                    "{} heads of dimension {}: both must be positive",
                    self.num_attention_heads, self.attention_head_dim
                ),
            );
        }
        if self.num_layers == 0 {
            return problem("num_layers", "0: the model needs at least one block".into());
        }
        let inner = self.inner_dim();
        if !inner.is_multiple_of(4) {
            return problem(
                "attention_head_dim",
                format!(
                    "hidden size {inner} (num_attention_heads × attention_head_dim) must be \
                     divisible by 4 for the 2-D sincos positional embedding"
                ),
            );
        }
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
        if self.patch_size == 0 || self.sample_size < self.patch_size {
            return problem(
                "patch_size",
                format!(
                    "{} must be positive and at most sample_size ({})",
                    self.patch_size, self.sample_size
                ),
            );
        }
        if self.pos_embed_max_size == Some(0) {
            return problem(
                "pos_embed_max_size",
                "0: the position table needs at least one patch (or null for none)".into(),
            );
        }
        if self.in_channels == 0 || self.out_channels() == 0 {
            return problem("in_channels", "channel counts must be positive".into());
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
}

/// The q, k, v projections of one token stream, fused into one matrix product, with their
/// optional RMS norms of q and k.
#[derive(Debug)]
struct QkvProjection {
    /// [q; k; v] (3·inner, D) and their biases.
    weight: Tensor,
    bias: Option<Tensor>,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
}

impl QkvProjection {
    /// `names` are the q, k, v projection modules and the q, k norms under `vb`.
    fn new(
        dim: usize,
        inner: usize,
        head_dim: usize,
        qk_norm: bool,
        names: [&str; 5],
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let linears = names[..3]
            .iter()
            .map(|n| candle_nn::linear(dim, inner, vb.pp(n)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let weight = Tensor::cat(&linears.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
        let bias = match linears.iter().map(|l| l.bias()).collect::<Option<Vec<_>>>() {
            Some(bs) => Some(Tensor::cat(&bs, 0)?),
            None => None,
        };
        let norm = |name: &str| -> candle_core::Result<Option<RmsNorm>> {
            qk_norm
                .then(|| RmsNorm::new(head_dim, NORM_EPS, true, vb.pp(name)))
                .transpose()
        };
        Ok(Self {
            weight: kernels::gemm_friendly_weight(&weight)?,
            bias,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
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
/// output projections, which the callers add in a fused residual.
#[derive(Debug)]
struct Attention {
    image: QkvProjection,
    to_out: Linear,
    /// The text side of a joint attention, and its output projection.
    text: Option<(QkvProjection, Option<Linear>)>,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(
        cfg: &Config,
        joint: bool,
        context_pre_only: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
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
        )?;
        let to_out =
            kernels::gemm_friendly_linear(&candle_nn::linear(dim, dim, vb.pp("to_out.0"))?)?;
        let text = joint
            .then(|| -> candle_core::Result<_> {
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
                )?;
                let out = (!context_pre_only)
                    .then(|| candle_nn::linear(dim, dim, vb.pp("to_add_out")))
                    .transpose()?
                    .map(|l| kernels::gemm_friendly_linear(&l))
                    .transpose()?;
                Ok((proj, out))
            })
            .transpose()?;
        Ok(Self {
            image,
            to_out,
            text,
            heads,
            head_dim,
        })
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
        Ok(kernels::matmul_t(&out, self.to_out.weight())?)
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
        let image = kernels::matmul_t(&image, self.to_out.weight())?;
        let text = match (to_add_out, text) {
            (Some(out), Some(t)) => Some(kernels::matmul_t(&t, out.weight())?),
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
    ff: FeedForward,
    /// None in the `context_pre_only` block.
    ff_context: Option<FeedForward>,
    dim: usize,
}

/// The `n` chunks of a (B, n·D) modulation, each (B, 1, D) and contiguous.
fn modulation_chunks(emb: &Tensor, n: usize, dim: usize) -> candle_core::Result<Vec<Tensor>> {
    let batch = emb.dim(0)?;
    (0..n)
        .map(|i| {
            emb.narrow(1, i * dim, dim)?
                .reshape((batch, 1, dim))?
                .contiguous()
        })
        .collect()
}

/// LayerNorm (no affine, eps 1e-6) then `·(1 + scale) + shift`, in one pass.
fn norm_modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    kernels::layer_norm_modulate(xs, shift, scale, NORM_EPS)
}

impl JointTransformerBlock {
    fn new(cfg: &Config, layer: usize, vb: VarBuilder) -> candle_core::Result<Self> {
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
            FeedForward::new(dim, 4 * dim, FeedForwardActivation::GeluTanh, vb.pp(name))
        };
        Ok(Self {
            norm1: adaln(if dual { 9 } else { 6 }, "norm1")?,
            norm1_context,
            attn: Attention::new(cfg, true, context_pre_only, vb.pp("attn"))?,
            attn2: dual
                .then(|| Attention::new(cfg, false, false, vb.pp("attn2")))
                .transpose()?,
            ff: ff("ff")?,
            ff_context: (!context_pre_only).then(|| ff("ff_context")).transpose()?,
            dim,
        })
    }

    /// (image (B, N, D), text (B, L, D)) -> (image, text; None after the last block).
    /// `temb` is the (B, D) conditioning and `temb_silu` its SiLU; `layer` and `attn2_site`
    /// name the attention sites.
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
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dim = self.dim;
        let chunks = if self.attn2.is_some() { 9 } else { 6 };
        let m = modulation_chunks(&self.norm1.forward(temb_silu)?, chunks, dim)?;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2,
        // scale_msa2, gate_msa2]
        let normed = norm_modulate(hidden, &m[0], &m[1])?;
        let (normed_context, context_mod) = match &self.norm1_context {
            ContextNorm::Zero(linear) => {
                let c = modulation_chunks(&linear.forward(temb_silu)?, 6, dim)?;
                (norm_modulate(encoder, &c[0], &c[1])?, Some(c))
            }
            ContextNorm::Continuous(norm) => (norm.forward(encoder, temb)?, None),
        };

        // SD3.5's second self-attention reads the block's input, normalized as for the
        // first, modulated with its own shift and scale.
        let normed2 = match &self.attn2 {
            Some(_) => Some(norm_modulate(hidden, &m[6], &m[7])?),
            None => None,
        };

        let (attn, context_attn) =
            self.attn
                .joint_attention(&normed, &normed_context, layer, processor)?;
        let mut hidden = kernels::gated_residual(hidden, Some(&m[2]), &attn, self.attn.out_bias())?;
        if let (Some(attn2), Some(normed2)) = (&self.attn2, normed2) {
            let attn = attn2.self_attention(&normed2, attn2_site, processor)?;
            hidden = kernels::gated_residual(&hidden, Some(&m[8]), &attn, attn2.out_bias())?;
        }
        let normed = norm_modulate(&hidden, &m[3], &m[4])?;
        let (ff, ff_bias) = self.ff.forward_without_out_bias(&normed)?;
        let hidden = kernels::gated_residual(&hidden, Some(&m[5]), &ff, ff_bias)?;

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
        let normed = norm_modulate(&encoder, &c[3], &c[4])?;
        let (ff, ff_bias) = ff_context.forward_without_out_bias(&normed)?;
        let encoder = kernels::gated_residual(&encoder, Some(&c[5]), &ff, ff_bias)?;
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
        cfg.validate().map_err(|p| {
            candle_core::Error::Msg(format!("config field `{}`: {}", p.field, p.message))
        })?;
        let dim = cfg.inner_dim();
        let p = cfg.patch_size;
        let out_channels = cfg.out_channels();
        let layers = match stage {
            Some(s) => s
                .layers(cfg.num_layers)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            None => 0..cfg.num_layers,
        };
        let (first, last) = stage.map_or((true, true), |s| (s.is_first(), s.is_last()));
        let pos_embed = first
            .then(|| PatchEmbed::new(cfg, vb.pp("pos_embed")))
            .transpose()?;
        let transformer_blocks = layers
            .clone()
            .map(|i| JointTransformerBlock::new(cfg, i, vb.pp("transformer_blocks").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
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
        })
    }

    /// Reads `dir/config.json` and the weights in `dir` (only a stage's, with
    /// `options.stage`); errors name the file, and the field or tensor at fault.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let file = dir.join("config.json");
        let config: Config = xfuser_core::config::read_json_config(&file)?;
        config.validate().map_err(|p| Error::Config {
            file: file.clone(),
            field: p.field.to_string(),
            message: p.message,
        })?;
        if let Some(stage) = &options.stage {
            // A stage that does not fit the model is a configuration error, not the weights'.
            stage.layers(config.num_layers)?;
        }
        let weights = WeightFiles::find(dir, "diffusion_pytorch_model")?;
        let (vb, loaded) = weights.counting_var_builder(options.dtype, &options.device)?;
        let mut model =
            Self::new_stage(&config, vb, options.stage.as_ref()).map_err(|e| weights.error(e))?;
        model.parameter_bytes = Some(loaded.get());
        Ok(model)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The timesteps as (B,): a single value is repeated over the batch.
    fn batch_timesteps(&self, timestep: &Tensor, batch: usize) -> Result<Tensor> {
        let t = timestep.flatten_all()?;
        match t.dim(0)? {
            n if n == batch => Ok(t),
            1 => Ok(t.broadcast_as(batch)?.contiguous()?),
            n => Err(Error::invalid(format!(
                "timestep has {n} values for a batch of {batch}"
            ))),
        }
    }

    fn patch_embedding(&self) -> Result<&PatchEmbed> {
        self.pos_embed.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "this PipeFusion stage of {CLASS_NAME} (blocks {:?}) holds no patch embedding: \
                 only the first stage embeds the image",
                self.layers
            ))
        })
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
        let timestep = self.batch_timesteps(inputs.timestep, batch)?;
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

    /// Checks the latent's shape: (B, in_channels, H, W) with H and W multiples of p.
    fn check_latent(&self, latent: &Tensor) -> Result<(usize, usize)> {
        let (_, channels, height, width) = latent.dims4()?;
        let p = self.config.patch_size;
        if channels != self.config.in_channels
            || !height.is_multiple_of(p)
            || !width.is_multiple_of(p)
        {
            return Err(Error::invalid(format!(
                "hidden_states {:?}: expected (B, {}, H, W) with H and W multiples of {p}",
                latent.dims(),
                self.config.in_channels
            )));
        }
        Ok((height / p, width / p))
    }

    /// This sp rank's tokens of the (B, C, H, W) latent: its token rows of the patch grid,
    /// then zero padding up to `sp.padded_len()`: (B, padded_len, D). The split is normally
    /// of the whole grid (`InputMetadata::full`); a split of some of its rows (a PipeFusion
    /// patch) makes the forward return those rows only.
    fn embed_sp_slice(&self, latent: &Tensor, sp: &SpContext) -> Result<Tensor> {
        let (batch, _, height, width) = latent.dims4()?;
        let p = self.config.patch_size;
        let (grid_rows, cols) = (height / p, width / p);
        let patch = sp.patch();
        if patch.token_rows.end > grid_rows || patch.tokens.len != patch.token_rows.len() * cols {
            return Err(Error::invalid(format!(
                "the sp split covers token rows {:?} ({} tokens) but the latent {:?} has a \
                 {grid_rows}x{cols} patch grid: compute the runtime state for this input shape",
                patch.token_rows,
                patch.tokens.len,
                latent.dims()
            )));
        }
        let embed = self.patch_embedding()?;
        // Checks the grid against the position table even on a rank without tokens.
        embed.pos_embed((grid_rows, cols), latent.device())?;
        let slice = sp.slice();
        if slice.token_rows.is_empty() {
            return Ok(Tensor::zeros(
                (batch, slice.padded_len, self.config.inner_dim()),
                self.dtype,
                latent.device(),
            )?);
        }
        let tokens = embed.forward_rows(latent, slice.token_rows.clone())?;
        Ok(tokens.pad_with_zeros(1, 0, slice.padding())?)
    }
}

impl Backbone for SD3Transformer2DModel {
    fn info(&self) -> &BackboneInfo {
        &self.info
    }

    fn embed(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<BlockState> {
        if let Some(sp) = &ctx.sp {
            sp.check_heads(self.info.num_attention_heads)?;
        }
        let (rows, cols) = self.check_latent(inputs.hidden_states)?;
        let latent = inputs.hidden_states.to_dtype(self.dtype)?;
        let (hidden, grid) = match &ctx.sp {
            None => (
                self.patch_embedding()?.forward_rows(&latent, 0..rows)?,
                (rows, cols),
            ),
            Some(sp) => (
                self.embed_sp_slice(&latent, sp)?,
                (sp.patch().token_rows.len(), cols),
            ),
        };
        self.conditioned_state(inputs, hidden, grid)
    }

    fn embed_conditioning(
        &self,
        inputs: &BackboneInputs,
        ctx: &ForwardContext,
    ) -> Result<BlockState> {
        if let Some(sp) = &ctx.sp {
            sp.check_heads(self.info.num_attention_heads)?;
        }
        let (batch, _, height, width) = inputs.hidden_states.dims4()?;
        let p = self.config.patch_size;
        let rows = ctx
            .sp
            .as_ref()
            .map_or(height / p, |sp| sp.patch().token_rows.len());
        // (B, 0, D): the image tokens come from the previous stage.
        let hidden = Tensor::zeros(
            (batch, 0, self.config.inner_dim()),
            self.dtype,
            inputs.hidden_states.device(),
        )?;
        self.conditioned_state(inputs, hidden, (rows, width / p))
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
        let held = &self.layers;
        let blocks = (layers.start >= held.start && layers.end <= held.end)
            .then(|| {
                self.transformer_blocks
                    .get(layers.start - held.start..layers.end - held.start)
            })
            .flatten()
            .ok_or_else(|| {
                Error::invalid(format!(
                    "blocks {layers:?} are not held here: this {} holds blocks {held:?} of {}",
                    if held.len() == self.info.num_layers {
                        "model"
                    } else {
                        "PipeFusion stage"
                    },
                    self.info.num_layers
                ))
            })?;
        if blocks.is_empty() {
            return Ok(state);
        }
        if ctx.sp.as_ref().is_some_and(|sp| sp.sp_group().size() > 1) && ctx.attention.is_none() {
            return Err(Error::invalid(
                "a sequence-parallel forward needs a parallel attention processor; build the \
                 context with ForwardContext::sequence_parallel",
            ));
        }
        let serial = SerialAttention;
        let processor: &dyn AttentionProcessor = ctx.attention.as_deref().unwrap_or(&serial);
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
            )?;
            state.hidden = hidden;
            state.encoder = encoder;
        }
        Ok(state)
    }

    fn head(&self, state: BlockState, ctx: &ForwardContext) -> Result<Tensor> {
        let (_, tokens, _) = state.hidden.dims3()?;
        let (rows, cols) = state.grid;
        let expected = ctx.sp.as_ref().map_or(rows * cols, |sp| sp.padded_len());
        if tokens != expected {
            return Err(Error::invalid(format!(
                "head: {tokens} tokens where {expected} were expected for a {rows}x{cols} patch \
                 grid{}",
                if ctx.sp.is_some() {
                    " split over the sp ranks"
                } else {
                    ""
                }
            )));
        }
        let (norm_out, proj_out) = self.final_layer.as_ref().ok_or_else(|| {
            Error::invalid(format!(
                "this PipeFusion stage of {CLASS_NAME} (blocks {:?}) holds no final layer: only \
                 the last stage runs the head",
                self.layers
            ))
        })?;
        let hidden = norm_out.forward(&state.hidden, state.conditioning(TEMB)?)?;
        let hidden = kernels::matmul_t(&hidden, proj_out.weight())?;
        let hidden = match proj_out.bias() {
            Some(b) => hidden.broadcast_add(b)?,
            None => hidden,
        };
        // Gathering after the projection moves p²·C_out values per token instead of D.
        let hidden = match &ctx.sp {
            None => hidden,
            // (B, P, p²C) -> (B, S·P, p²C), real tokens first -> (B, rows·cols, p²C)
            Some(sp) => {
                sp.sp_group()
                    .all_gather(&hidden.contiguous()?, 1)?
                    .narrow(1, 0, sp.num_tokens())?
            }
        };
        Ok(unpatchify(
            &hidden,
            state.grid,
            self.config.patch_size,
            self.info.out_channels,
        )?)
    }
}

/// (B, rows·cols, p·p·C) -> (B, C, rows·p, cols·p): each token's values are laid out
/// (p row, p column, channel), diffusers' einsum `nhwpqc->nchpwq`.
fn unpatchify(
    xs: &Tensor,
    grid: (usize, usize),
    p: usize,
    channels: usize,
) -> candle_core::Result<Tensor> {
    let b = xs.dim(0)?;
    let (rows, cols) = grid;
    xs.reshape((b, rows, cols, p, p, channels))?
        .permute((0, 5, 1, 3, 2, 4))?
        .reshape((b, channels, rows * p, cols * p))
}

fn load_backbone(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backbone>> {
    Ok(Box::new(SD3Transformer2DModel::load(dir, options)?))
}

fn config_shape(config: &serde_json::Value, file: &Path) -> Result<ModelShape> {
    let cfg: Config = xfuser_core::config::json_value_config(config, file)?;
    Ok(ModelShape {
        num_attention_heads: cfg.num_attention_heads,
        num_layers: cfg.num_layers,
    })
}

xfuser_core::inventory::submit! {
    TransformerEntry { class_name: CLASS_NAME, load: load_backbone, shape: config_shape }
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

    #[test]
    fn unpatchify_inverts_patchify_layout() {
        // Each token's (p, q, channel) entry holds the value expected at its output pixel.
        let (rows, cols, p, ch) = (2, 3, 2, 2);
        let mut data = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                for pi in 0..p {
                    for qi in 0..p {
                        for k in 0..ch {
                            let (y, x) = (r * p + pi, c * p + qi);
                            data.push((k * 10000 + y * 100 + x) as f32);
                        }
                    }
                }
            }
        }
        let xs = Tensor::from_vec(data, (1, rows * cols, p * p * ch), &Device::Cpu).unwrap();
        let img = unpatchify(&xs, (rows, cols), p, ch).unwrap();
        let img: Vec<Vec<Vec<f32>>> = img.squeeze(0).unwrap().to_vec3().unwrap();
        for (k, plane) in img.iter().enumerate() {
            for (y, row) in plane.iter().enumerate() {
                for (x, v) in row.iter().enumerate() {
                    assert_eq!(*v, (k * 10000 + y * 100 + x) as f32);
                }
            }
        }
    }
}
