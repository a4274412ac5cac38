//! DiT, the class-conditional diffusion transformer of Peebles & Xie
//! (<https://arxiv.org/abs/2212.09748>): a port of diffusers'
//! `models/transformers/dit_transformer_2d.py` (`DiTTransformer2DModel`, whose blocks are
//! `BasicTransformerBlock` with `norm_type="ada_norm_zero"`).
//!
//! The model, as this file computes it:
//! - `pos_embed`: the patch embedding with the fixed 2-D sin-cos position embedding.
//! - every block has its own adaLN-Zero conditioning: `norm1.emb` embeds the timestep (256
//!   sinusoid channels, frequency shift 1) and the class label (a table of
//!   `num_embeds_ada_norm + 1` rows, the last one the null class of classifier-free guidance);
//!   `norm1.linear` maps SiLU(their sum) to six modulations: shift, scale and gate of the
//!   self-attention, then of the feed-forward. No cross-attention: DiT has no text.
//! - the head modulates the final norm with `proj_out_1` of block 0's embedding (shift, then
//!   scale), projects with `proj_out_2` to p²·out_channels per token and unpatchifies. With
//!   learned sigma (`out_channels` = 2·`in_channels`) the second half of the channels is the
//!   variance, which the denoising loop drops.
//!
//! The forward is split as the backbone contract asks (docs/model-contract.md): `embed`
//! (patch tokens, the timestep's sinusoids, the labels), `blocks`, `head`. Every parallel
//! method comes from the runtime: the shared pieces of `xfuser_transformers::backbone_common`
//! embed a sequence-parallel rank's token rows and gather them in the head, and the blocks'
//! self-attention goes through the context's processor (Ulysses, Ring, USP, PipeFusion). A
//! PipeFusion stage holds its blocks, the patch embedding on the first stage, and block 0's
//! embedding with `proj_out_*` on the last. Tensor parallelism
//! ([`DiTTransformer2DModel::new_shard`]) splits each block as PixArt's without the
//! cross-attention: `attn1` by heads and `ff` by hidden features, with xfuser-layers' column-
//! and row-parallel linears; the block all-reduces their partial outputs over
//! [`ForwardContext::tp`] through `backbone_common::tp_all_reduce`.

use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Module, Tensor};
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
use xfuser_layers::embeddings::{get_timestep_embedding, PatchEmbed, TimestepEmbedding};
use xfuser_layers::feed_forward::{FeedForwardActivation, ParallelFeedForward};
use xfuser_layers::normalization::LayerNorm;
use xfuser_layers::tensor_parallel::{ColumnParallelLinear, RowParallelLinear, SplitWeights};
use xfuser_transformers::backbone_common::{self as common, ConfigProblem, ModelConfig};

pub const CLASS_NAME: &str = "DiTTransformer2DModel";

/// Width of the timestep sinusoids every `norm1.emb` embeds.
const TIME_PROJ_DIM: usize = 256;

/// The block state's model-own tensors: the timestep sinusoids (B, 256) and the class labels
/// (B,) u32, from which each block computes its own adaLN-Zero embedding.
const TIME_PROJ: &str = "dit_timestep_proj";
const LABELS: &str = "dit_class_labels";

/// `config.json` of a DiT transformer, field for field with diffusers' defaults. Keys that only
/// the old `Transformer2DModel` class reads (facebook/DiT-XL-2-256 still names that class) are
/// ignored, as diffusers ignores them when it remaps the class to this one.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct Config {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    /// null: `in_channels`; DiT-XL/2: 2·in_channels (learned sigma).
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    /// Training only.
    pub dropout: f64,
    /// Unused by DiT (kept because diffusers' configs carry it).
    pub norm_num_groups: usize,
    pub attention_bias: bool,
    pub sample_size: usize,
    pub patch_size: usize,
    pub activation_fn: String,
    /// The number of classes; the label table has one row more, the null class.
    pub num_embeds_ada_norm: Option<usize>,
    /// The attention softmax is always computed in f32 here, so this changes nothing.
    pub upcast_attention: bool,
    pub norm_type: String,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: None,
            num_layers: 28,
            dropout: 0.0,
            norm_num_groups: 32,
            attention_bias: true,
            sample_size: 32,
            patch_size: 2,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: "ada_norm_zero".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-5,
        }
    }
}

impl Config {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The number of classes (the null class is this index).
    pub fn num_classes(&self) -> usize {
        self.num_embeds_ada_norm.unwrap_or(0)
    }

    /// Checks that the model described can be built and run; names the first bad field.
    pub fn validate(&self) -> std::result::Result<(), ConfigProblem> {
        let problem = |field, message: String| Err(ConfigProblem { field, message });
        if self.norm_type != "ada_norm_zero" {
            return problem(
                "norm_type",
                format!(
                    "`{}` is not supported by {CLASS_NAME}; only `ada_norm_zero`",
                    self.norm_type
                ),
            );
        }
        if self.num_embeds_ada_norm.is_none_or(|n| n == 0) {
            return problem(
                "num_embeds_ada_norm",
                "must be the (positive) number of classes with norm_type `ada_norm_zero`".into(),
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
        common::check_attention_heads(self.num_attention_heads, self.attention_head_dim)?;
        common::check_sincos_width(self.inner_dim())?;
        common::check_patch_size(self.patch_size, self.sample_size)?;
        common::check_channels(self.in_channels, self.out_channels())?;
        let (cin, cout) = (self.in_channels, self.out_channels());
        if cout != cin && cout != 2 * cin {
            return problem(
                "out_channels",
                format!(
                    "{cout}: must be in_channels ({cin}) or, with learned sigma, twice that; the \
                     pipeline keeps the first {cin} channels as the noise prediction"
                ),
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

/// diffusers' `CombinedTimestepLabelEmbeddings` at inference (no label dropout):
/// `timestep_embedder(sinusoids) + embedding_table[label]`.
#[derive(Debug)]
struct TimestepLabelEmbedding {
    timestep_embedder: TimestepEmbedding,
    /// (num_classes + 1, D); row `num_classes` is the null class.
    table: Tensor,
}

impl TimestepLabelEmbedding {
    fn new(num_classes: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(
                TIME_PROJ_DIM,
                dim,
                vb.pp("timestep_embedder"),
            )?,
            table: vb.get(
                (num_classes + 1, dim),
                "class_embedder.embedding_table.weight",
            )?,
        })
    }

    /// (B, 256) sinusoids and (B,) u32 labels -> (B, D).
    fn forward(&self, time_proj: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        let t = self
            .timestep_embedder
            .forward(&time_proj.to_dtype(self.table.dtype())?)?;
        t + self.table.index_select(labels, 0)?
    }
}

/// Self-attention with diffusers' `Attention` weights (`to_q`, `to_k`, `to_v`, `to_out.0`):
/// q, k and v as one matrix product, split into heads with their biases in one pass. Under
/// tensor parallelism `to_q/k/v` are column-parallel (this rank's H/T heads) and `to_out.0`
/// row-parallel, so the output is this rank's partial sum, to be all-reduced.
#[derive(Debug)]
struct SelfAttention {
    /// [to_q; to_k; to_v] (3·inner/T, D) and their biases.
    w_qkv: Tensor,
    b_qkv: Option<Tensor>,
    to_out: RowParallelLinear,
    /// The heads this rank computes.
    heads: usize,
    head_dim: usize,
    /// Bytes of the split weights kept.
    split_bytes: usize,
}

impl SelfAttention {
    /// Shard `tp` of the attention at `split`: `heads` of `head_dim` in all, H/T of them here.
    fn new(
        dim: usize,
        (heads, head_dim): (usize, usize),
        bias: bool,
        tp: TpRank,
        split: &SplitWeights,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let proj = |name: &str| ColumnParallelLinear::load(dim, inner, bias, tp, &split.pp(name));
        let (q, k, v) = (proj("to_q")?, proj("to_k")?, proj("to_v")?);
        let (w_qkv, b_qkv) = common::fuse_columns(&[&q, &k, &v])?;
        let to_out = RowParallelLinear::load(inner, dim, true, tp, &split.pp("to_out.0"))?;
        let split_bytes = [&q, &k, &v]
            .iter()
            .map(|l| l.parameter_bytes())
            .sum::<usize>()
            + to_out.parameter_bytes();
        Ok(Self {
            w_qkv,
            b_qkv,
            to_out,
            heads: heads / tp.size,
            head_dim,
            split_bytes,
        })
    }

    /// (B, N, D) -> this rank's (B, N, D) partial product of to_out, without its bias (the
    /// caller all-reduces it and adds the bias in the residual). `layer` names the attention
    /// site for the processor (PipeFusion keeps its stale K/V).
    fn forward(
        &self,
        xs: &Tensor,
        layer: usize,
        processor: &dyn AttentionProcessor,
    ) -> Result<Tensor> {
        let qkv = kernels::split_heads(
            &kernels::matmul_t(xs, &self.w_qkv)?,
            self.b_qkv.as_ref(),
            3,
            self.heads,
        )?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let merged = if processor.name() == SerialAttention.name() {
            // The serial processor's math, with the heads merged on the way out.
            kernels::attention_merged(&qkv[0], &qkv[1], &qkv[2], None, scale)?
        } else {
            let out = processor.self_attention(layer, &qkv[0], &qkv[1], &qkv[2], scale)?;
            let (b, _, n, _) = out.dims4()?;
            out.transpose(1, 2)?
                .contiguous()?
                .reshape((b, n, self.heads * self.head_dim))?
        };
        self.to_out.forward_partial(&merged)
    }

    fn out_bias(&self) -> Option<&Tensor> {
        self.to_out.bias()
    }
}

/// diffusers' `BasicTransformerBlock` with `norm_type="ada_norm_zero"` and no cross-attention.
/// Under tensor parallelism the attention (by heads) and the feed-forward (`net.0.proj`
/// column, `net.2` row) are split, the rest replicated: two all-reduces per block.
#[derive(Debug)]
struct DiTBlock {
    /// `norm1.emb`: this block's own timestep + label embedding.
    emb: TimestepLabelEmbedding,
    /// `norm1.linear`: SiLU(emb) -> six (D) modulations.
    modulation: Linear,
    attn1: SelfAttention,
    norm3: LayerNorm,
    ff: ParallelFeedForward,
    dim: usize,
}

impl DiTBlock {
    /// Shard `tp` of the block: `attn1` and `ff` from `split`, the rest whole from `vb`.
    fn new(
        cfg: &Config,
        activation: FeedForwardActivation,
        vb: VarBuilder,
        tp: TpRank,
        split: &SplitWeights,
    ) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            emb: TimestepLabelEmbedding::new(cfg.num_classes(), dim, vb.pp("norm1.emb"))?,
            modulation: candle_nn::linear(dim, 6 * dim, vb.pp("norm1.linear"))?,
            attn1: SelfAttention::new(
                dim,
                (cfg.num_attention_heads, cfg.attention_head_dim),
                cfg.attention_bias,
                tp,
                &split.pp("attn1"),
            )?,
            norm3: LayerNorm::new(
                dim,
                cfg.norm_eps,
                cfg.norm_elementwise_affine,
                vb.pp("norm3"),
            )?,
            ff: ParallelFeedForward::load(dim, 4 * dim, activation, tp, &split.pp("ff"))?,
            dim,
        })
    }

    /// Bytes of the split layers' weights this rank keeps.
    fn split_parameter_bytes(&self) -> usize {
        self.attn1.split_bytes + self.ff.parameter_bytes()
    }

    /// The six (B, 1, D) modulations: shift, scale, gate of attention, then of the MLP.
    fn modulation(&self, time_proj: &Tensor, labels: &Tensor, batch: usize) -> Result<Vec<Tensor>> {
        let emb = self.emb.forward(time_proj, labels)?;
        let m = self
            .modulation
            .forward(&emb.silu()?)?
            .reshape((batch, 6, self.dim))?;
        Ok((0..6)
            .map(|i| m.narrow(1, i, 1)?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?)
    }

    /// `norm1` of `hidden` with the attention's shift and scale: the attention's input.
    fn modulated_input(
        &self,
        hidden: &Tensor,
        time_proj: &Tensor,
        labels: &Tensor,
    ) -> Result<Tensor> {
        let m = self.modulation(time_proj, labels, hidden.dim(0)?)?;
        norm1(hidden, &m[0], &m[1])
    }

    /// hidden (B, N, D) -> (B, N, D); `tp` is the group the split layers' partial outputs are
    /// all-reduced over (None: whole layers).
    fn forward(
        &self,
        hidden: &Tensor,
        time_proj: &Tensor,
        labels: &Tensor,
        layer: usize,
        processor: &dyn AttentionProcessor,
        tp: Option<&ProcessGroup>,
    ) -> Result<Tensor> {
        let m = self.modulation(time_proj, labels, hidden.dim(0)?)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);

        let normed = norm1(hidden, shift_msa, scale_msa)?;
        let attn = common::tp_all_reduce(self.attn1.forward(&normed, layer, processor)?, tp)?;
        let hidden = kernels::gated_residual(hidden, Some(gate_msa), &attn, self.attn1.out_bias())?;

        let normed = self
            .norm3
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

/// `norm1`'s own LayerNorm (no affine, eps 1e-6 whatever the config says), modulated.
fn norm1(hidden: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(kernels::layer_norm_modulate(hidden, shift, scale, 1e-6)?)
}

/// The head: block 0's embedding, `proj_out_1` (shift and scale of the final norm) and
/// `proj_out_2`.
#[derive(Debug)]
struct FinalLayer {
    /// Block 0's `norm1.emb`, loaded apart when this part of the model does not hold block 0.
    emb: Option<TimestepLabelEmbedding>,
    proj_out_1: Linear,
    proj_out_2: Linear,
}

/// diffusers' `DiTTransformer2DModel`, or one PipeFusion stage of it.
#[derive(Debug)]
pub struct DiTTransformer2DModel {
    info: BackboneInfo,
    config: Config,
    /// None on PipeFusion stages after the first.
    pos_embed: Option<PatchEmbed>,
    /// The blocks `layers` (all of them unless this is a PipeFusion stage).
    transformer_blocks: Vec<DiTBlock>,
    layers: Range<usize>,
    norm_out: LayerNorm,
    /// None on PipeFusion stages before the last.
    final_layer: Option<FinalLayer>,
    /// Bytes of the weights loaded, when loaded from files.
    parameter_bytes: Option<u64>,
    dtype: DType,
    /// The tensor-parallel shard this instance holds (the whole model: serial).
    tp: TpRank,
}

/// The DiT backbone under xDiT's name for a model it wraps (`xFuser` + name + `Wrapper`). Here
/// the backbone implements the contract itself, so the wrapper is the model.
#[allow(non_camel_case_types)]
pub type xFuserDiTTransformer2DWrapper = DiTTransformer2DModel;

impl DiTTransformer2DModel {
    /// Builds the whole model from `vb` (names as in diffusers' state dict).
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
    /// block `attn1.to_q/k/v` column-parallel (this rank's H/T heads), `attn1.to_out.0`
    /// row-parallel and `ff` (`net.0.proj` column, `net.2` row) read from `split`; everything
    /// else (`norm1.emb`, `norm1.linear`, `norm3`, `pos_embed`, `proj_out_1/2`) whole from
    /// `vb`. The forward then needs the tp group in its [`ForwardContext::tp`].
    pub fn new_shard(
        cfg: &Config,
        vb: VarBuilder,
        split: SplitWeights,
        tp: TpRank,
        stage: Option<&PipelineStage>,
    ) -> Result<Self> {
        let common::StageLayers {
            layers,
            first,
            last,
        } = common::stage_layers(cfg, stage)?;
        common::check_tp_heads(CLASS_NAME, cfg.num_attention_heads, tp)?;
        let activation = FeedForwardActivation::from_diffusers_name(&cfg.activation_fn)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{CLASS_NAME}: activation_fn `{}` is not supported",
                    cfg.activation_fn
                ))
            })?;
        let dim = cfg.inner_dim();
        let p = cfg.patch_size;
        let out_channels = cfg.out_channels();
        let pos_embed = first
            .then(|| {
                // DiT's PatchEmbed: interpolation scale 1, base size sample_size / p.
                PatchEmbed::new(
                    cfg.sample_size,
                    p,
                    cfg.in_channels,
                    dim,
                    1.0,
                    vb.pp("pos_embed"),
                )
            })
            .transpose()?;
        let blocks_vb = vb.pp("transformer_blocks");
        let blocks_split = split.pp("transformer_blocks");
        let transformer_blocks = layers
            .clone()
            .map(|i| DiTBlock::new(cfg, activation, blocks_vb.pp(i), tp, &blocks_split.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer = last
            .then(|| -> candle_core::Result<_> {
                let emb = (!layers.contains(&0))
                    .then(|| {
                        TimestepLabelEmbedding::new(
                            cfg.num_classes(),
                            dim,
                            blocks_vb.pp(0).pp("norm1.emb"),
                        )
                    })
                    .transpose()?;
                Ok(FinalLayer {
                    emb,
                    proj_out_1: candle_nn::linear(dim, 2 * dim, vb.pp("proj_out_1"))?,
                    proj_out_2: candle_nn::linear(dim, p * p * out_channels, vb.pp("proj_out_2"))?,
                })
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
            // No text: nothing to project.
            caption_channels: 0,
            updates_text_stream: false,
        };
        Ok(Self {
            info,
            config: cfg.clone(),
            pos_embed,
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

    /// Bytes of the split layers' weights (attention and feed-forward of the blocks held)
    /// that this instance keeps: 1/T of the whole model's, except the row-parallel biases
    /// (`to_out.0`, `ff.net.2`), which every rank holds whole.
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

    fn patch_embedding(&self) -> Result<&PatchEmbed> {
        self.pos_embed
            .as_ref()
            .ok_or_else(|| common::no_patch_embedding(CLASS_NAME, &self.layers))
    }

    /// The class labels as (B,) u32, each checked against the label table (the null class
    /// `num_classes` included).
    fn labels(&self, conditioning: &Conditioning, batch: usize) -> Result<Tensor> {
        let labels = conditioning.require(names::CLASS_LABELS, CLASS_NAME)?;
        let values: Vec<i64> = labels.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
        if values.len() != batch {
            return Err(Error::invalid(format!(
                "{CLASS_NAME}: {} class labels for a batch of {batch}",
                values.len()
            )));
        }
        let classes = self.config.num_classes();
        if let Some(bad) = values.iter().find(|&&v| v < 0 || v as usize > classes) {
            return Err(Error::invalid(format!(
                "{CLASS_NAME}: class label {bad} is outside 0..={classes} (num_embeds_ada_norm \
                 {classes} classes, then the null class {classes})"
            )));
        }
        let values: Vec<u32> = values.iter().map(|&v| v as u32).collect();
        Ok(Tensor::from_vec(values, batch, labels.device())?)
    }

    /// The conditioning part of `embed`: the timestep sinusoids and the labels, around the
    /// image tokens `hidden` of a `grid`.
    fn conditioned_state(
        &self,
        inputs: &BackboneInputs,
        hidden: Tensor,
        grid: (usize, usize),
    ) -> Result<BlockState> {
        let batch = inputs.hidden_states.dim(0)?;
        let timestep = common::batch_timesteps(inputs.timestep, batch)?;
        // diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`.
        let time_proj = get_timestep_embedding(&timestep, TIME_PROJ_DIM, true, 1.0, 1.0, 10000.0)?;
        let labels = self.labels(inputs.conditioning, batch)?;
        Ok(BlockState {
            hidden,
            encoder: None,
            encoder_bias: None,
            conditioning: Conditioning::new()
                .with(TIME_PROJ, time_proj)
                .with(LABELS, labels),
            grid,
        })
    }
}

impl Backbone for DiTTransformer2DModel {
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
        let time_proj = state.conditioning(TIME_PROJ)?.clone();
        let labels = state.conditioning(LABELS)?.clone();
        for (layer, block) in layers.zip(blocks) {
            state.hidden =
                block.forward(&state.hidden, &time_proj, &labels, layer, processor, tp)?;
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
        let time_proj = state.conditioning(TIME_PROJ)?;
        let labels = state.conditioning(LABELS)?;
        Ok(Some(first[0].modulated_input(
            &state.hidden,
            time_proj,
            labels,
        )?))
    }

    fn head(&self, state: BlockState, ctx: &ForwardContext) -> Result<Tensor> {
        common::check_head_tokens(&state, ctx)?;
        let (batch, _, dim) = state.hidden.dims3()?;
        let head = self
            .final_layer
            .as_ref()
            .ok_or_else(|| common::no_final_layer(CLASS_NAME, &self.layers))?;
        let emb = match (&head.emb, self.transformer_blocks.first()) {
            (Some(emb), _) => emb,
            (None, Some(block0)) => &block0.emb,
            (None, None) => return Err(common::no_final_layer(CLASS_NAME, &self.layers)),
        };
        let cond = emb.forward(state.conditioning(TIME_PROJ)?, state.conditioning(LABELS)?)?;
        // (B, 2·D): shift first, then scale.
        let shift_scale = head.proj_out_1.forward(&cond.silu()?)?;
        let shift = shift_scale.narrow(1, 0, dim)?.reshape((batch, 1, dim))?;
        let scale = shift_scale.narrow(1, dim, dim)?.reshape((batch, 1, dim))?;
        let hidden = self
            .norm_out
            .forward_modulated(&state.hidden, &shift, &scale)?;
        let hidden = head.proj_out_2.forward(&hidden)?;
        common::gather_and_unpatchify(hidden, state.grid, ctx, &self.info)
    }
}

/// The registry's loader (also referenced by [`crate::link`], which keeps this file's
/// registrations in every binary that links the crate).
pub fn load_backbone(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backbone>> {
    Ok(Box::new(DiTTransformer2DModel::load(dir, options)?))
}

fn is_ada_norm_zero(config: &serde_json::Value) -> bool {
    config.get("norm_type").and_then(|v| v.as_str()) == Some("ada_norm_zero")
}

xfuser_core::inventory::submit! {
    TransformerEntry {
        class_name: CLASS_NAME,
        load: load_backbone,
        shape: common::config_shape::<Config>,
        tensor_parallel: true,
    }
}

// diffusers' `_CLASS_REMAPPING_DICT`: facebook/DiT-XL-2-256 still names `Transformer2DModel`.
xfuser_core::inventory::submit! {
    ClassAlias {
        kind: Kind::Transformer,
        alias: "Transformer2DModel",
        target: CLASS_NAME,
        applies: is_ada_norm_zero,
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
        assert_eq!(cfg.out_channels(), 4);
        assert_eq!(cfg.num_classes(), 1000);
        assert_eq!(cfg.norm_eps, 1e-5);
        assert!(cfg.validate().is_ok());
        // DiT-XL/2 as its repository's config has it (old class name, extra keys ignored).
        let cfg = parse(
            r#"{"_class_name": "Transformer2DModel", "out_channels": 8, "cross_attention_dim": null,
                "num_vector_embeds": null, "use_linear_projection": false}"#,
        );
        assert_eq!(cfg.out_channels(), 8);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unsupported_configs_name_the_field() {
        let bad = [
            (
                r#"{"norm_type": "ada_norm_single"}"#,
                "norm_type",
                "ada_norm_single",
            ),
            (
                r#"{"num_embeds_ada_norm": null}"#,
                "num_embeds_ada_norm",
                "number of classes",
            ),
            (r#"{"activation_fn": "geglu"}"#, "activation_fn", "geglu"),
            (r#"{"out_channels": 6}"#, "out_channels", "6"),
            (
                r#"{"num_attention_heads": 1, "attention_head_dim": 6}"#,
                "attention_head_dim",
                "divisible by 4",
            ),
        ];
        for (json, field, value) in bad {
            let p = parse(json).validate().unwrap_err();
            assert_eq!(p.field, field, "{json}");
            assert!(p.message.contains(value), "{json}: {}", p.message);
        }
    }
}
