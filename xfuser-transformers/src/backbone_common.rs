//! What the backbones of this crate do alike around their own layers: the stage-aware loading
//! (config read and checked, a PipeFusion stage's blocks, the counted weights), the checks of
//! the inputs, the image tokens `embed` starts from (the whole latent's, or a
//! sequence-parallel rank's rows, padded), the blocks a call may run, and the head's epilogue
//! (the sp all-gather, the padding dropped, unpatchify).
//!
//! Each model keeps its own modules, conditioning and blocks; the error messages here are the
//! ones both models gave. Public so that a model outside this crate (a plugin such as
//! examples/dit-plugin) builds on the same pieces instead of copying them.

use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};
use xfuser_core::attention::{AttentionProcessor, SerialAttention};
use xfuser_core::backbone::{BackboneInfo, BlockState, ForwardContext, PipelineStage, SpContext};
use xfuser_core::distributed::{ProcessGroup, TpRank};
use xfuser_core::kernels;
use xfuser_core::registry::{LoadOptions, ModelShape};
use xfuser_core::weights::WeightFiles;
use xfuser_core::{Error, Result};
use xfuser_layers::tensor_parallel::{ColumnParallelLinear, SafetensorsShards, SplitWeights};

/// A configuration this port cannot run: the offending field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub field: &'static str,
    pub message: String,
}

fn problem(field: &'static str, message: String) -> std::result::Result<(), ConfigProblem> {
    Err(ConfigProblem { field, message })
}

/// Both head counts positive.
pub fn check_attention_heads(
    num_attention_heads: usize,
    attention_head_dim: usize,
) -> std::result::Result<(), ConfigProblem> {
    if num_attention_heads == 0 || attention_head_dim == 0 {
        return problem(
            "num_attention_heads",
            format!(
                "{num_attention_heads} heads of dimension {attention_head_dim}: both must be \
                 positive"
            ),
        );
    }
    Ok(())
}

/// A hidden size the 2-D sin-cos position embedding can split (in four).
pub fn check_sincos_width(inner: usize) -> std::result::Result<(), ConfigProblem> {
    if !inner.is_multiple_of(4) {
        return problem(
            "attention_head_dim",
            format!(
                "hidden size {inner} (num_attention_heads × attention_head_dim) must be \
                 divisible by 4 for the 2-D sincos positional embedding"
            ),
        );
    }
    Ok(())
}

/// A patch size in 1..=sample_size.
pub fn check_patch_size(
    patch_size: usize,
    sample_size: usize,
) -> std::result::Result<(), ConfigProblem> {
    if patch_size == 0 || sample_size < patch_size {
        return problem(
            "patch_size",
            format!("{patch_size} must be positive and at most sample_size ({sample_size})"),
        );
    }
    Ok(())
}

/// Positive latent channel counts.
pub fn check_channels(
    in_channels: usize,
    out_channels: usize,
) -> std::result::Result<(), ConfigProblem> {
    if in_channels == 0 || out_channels == 0 {
        return problem("in_channels", "channel counts must be positive".into());
    }
    Ok(())
}

/// What the shared loading code needs of a model's `config.json`.
pub trait ModelConfig: serde::de::DeserializeOwned {
    /// The model's own `validate`: whether it can be built and run.
    fn check(&self) -> std::result::Result<(), ConfigProblem>;
    fn shape(&self) -> ModelShape;
}

/// The registry's `shape` of a model: its sizes, from the parsed `config.json` alone.
pub fn config_shape<C: ModelConfig>(config: &serde_json::Value, file: &Path) -> Result<ModelShape> {
    let cfg: C = xfuser_core::config::json_value_config(config, file)?;
    Ok(cfg.shape())
}

/// The part of a model that one build holds: the blocks `layers`, the patch embedding when
/// `first`, the final layer when `last` (everything without a PipeFusion stage).
pub struct StageLayers {
    pub layers: Range<usize>,
    pub first: bool,
    pub last: bool,
}

/// Checks `cfg` and places `stage` (None: the whole model) in it, for a model's `new_stage`.
pub fn stage_layers<C: ModelConfig>(
    cfg: &C,
    stage: Option<&PipelineStage>,
) -> candle_core::Result<StageLayers> {
    cfg.check().map_err(|p| {
        candle_core::Error::Msg(format!("config field `{}`: {}", p.field, p.message))
    })?;
    let layers = match stage {
        Some(s) => s
            .layers(cfg.shape().num_layers)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
        None => 0..cfg.shape().num_layers,
    };
    let (first, last) = stage.map_or((true, true), |s| (s.is_first(), s.is_last()));
    Ok(StageLayers {
        layers,
        first,
        last,
    })
}

/// A model's `load`: reads `dir/config.json` and builds the model (only `options.stage`'s
/// part) with `build` from the weights in `dir`; returns it with the bytes of the weights it
/// fetched. Errors name the file, and the field or tensor at fault.
pub fn load_stage<C: ModelConfig, M>(
    dir: &Path,
    options: &LoadOptions,
    build: impl FnOnce(&C, VarBuilder<'static>, Option<&PipelineStage>) -> candle_core::Result<M>,
) -> Result<(M, u64)> {
    let config: C = checked_config(dir, options)?;
    let weights = WeightFiles::find(dir, "diffusion_pytorch_model")?;
    let (vb, loaded) = weights.counting_var_builder(options.dtype, &options.device)?;
    let model = build(&config, vb, options.stage.as_ref()).map_err(|e| weights.error(e))?;
    Ok((model, loaded.get()))
}

/// `dir/config.json`, parsed and checked, and the stage of `options` checked against it (a
/// stage that does not fit the model is a configuration error, not the weights').
fn checked_config<C: ModelConfig>(dir: &Path, options: &LoadOptions) -> Result<C> {
    let file = dir.join("config.json");
    let config: C = xfuser_core::config::read_json_config(&file)?;
    config.check().map_err(|p| Error::Config {
        file: file.clone(),
        field: p.field.to_string(),
        message: p.message,
    })?;
    if let Some(stage) = &options.stage {
        stage.layers(config.shape().num_layers)?;
    }
    Ok(config)
}

/// As [`load_stage`] for a model that splits layers over a tensor-parallel group
/// ([`LoadOptions::tp`]): `build` gets, besides the VarBuilder of the replicated modules, the
/// [`SplitWeights`] of the checkpoint's files, from which each split layer copies only its
/// shard. The bytes returned are those the VarBuilder fetched; the model adds its split
/// layers' own. Errors name the file, and the field or tensor at fault.
pub fn load_stage_split<C: ModelConfig, M>(
    dir: &Path,
    options: &LoadOptions,
    build: impl FnOnce(
        &C,
        VarBuilder<'static>,
        SplitWeights<'static>,
        Option<&PipelineStage>,
    ) -> Result<M>,
) -> Result<(M, u64)> {
    let config: C = checked_config(dir, options)?;
    let weights = WeightFiles::find(dir, "diffusion_pytorch_model")?;
    let (vb, loaded) = weights.counting_var_builder(options.dtype, &options.device)?;
    let files = SafetensorsShards::open(&weights.files, options.dtype, &options.device)?;
    let model = build(
        &config,
        vb,
        SplitWeights::Files(files),
        options.stage.as_ref(),
    )
    .map_err(|e| match e {
        Error::Candle(e) => weights.error(e),
        e => e,
    })?;
    Ok((model, loaded.get()))
}

/// Linear layers that read the same input as one matrix product: their weights stacked (as
/// [`kernels::gemm_friendly_weight`]) and their biases joined (None unless all have one).
pub fn fuse_linears(ls: &[&Linear]) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let w = Tensor::cat(&ls.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
    let w = kernels::gemm_friendly_weight(&w)?;
    let b = match ls.iter().map(|l| l.bias()).collect::<Option<Vec<_>>>() {
        Some(bs) => Some(Tensor::cat(&bs, 0)?),
        None => None,
    };
    Ok((w, b))
}

/// The error of a stage asked to embed the image without holding the patch embedding.
pub fn no_patch_embedding(class_name: &str, layers: &Range<usize>) -> Error {
    Error::invalid(format!(
        "this PipeFusion stage of {class_name} (blocks {layers:?}) holds no patch embedding: \
         only the first stage embeds the image"
    ))
}

/// The error of a stage asked to run the head without holding the final layer.
pub fn no_final_layer(class_name: &str, layers: &Range<usize>) -> Error {
    Error::invalid(format!(
        "this PipeFusion stage of {class_name} (blocks {layers:?}) holds no final layer: only \
         the last stage runs the head"
    ))
}

/// The timesteps as (B,): a single value is repeated over the batch.
pub fn batch_timesteps(timestep: &Tensor, batch: usize) -> Result<Tensor> {
    let t = timestep.flatten_all()?;
    match t.dim(0)? {
        n if n == batch => Ok(t),
        1 => Ok(t.broadcast_as(batch)?.contiguous()?),
        n => Err(Error::invalid(format!(
            "timestep has {n} values for a batch of {batch}"
        ))),
    }
}

/// A patch embedding that embeds some token rows of a latent (a sequence-parallel rank's),
/// with their rows of the whole grid's position embedding.
pub trait PatchRows {
    /// (B, C, H, W) -> (B, rows.len()·(W/p), D).
    fn forward_rows(&self, latent: &Tensor, rows: Range<usize>) -> Result<Tensor>;

    /// Whether a latent of this `(rows, cols)` patch grid can be embedded at all; checked
    /// even on an sp rank without tokens, so that every rank refuses it.
    fn check_grid(&self, _grid: (usize, usize), _device: &Device) -> Result<()> {
        Ok(())
    }
}

impl PatchRows for xfuser_layers::embeddings::PatchEmbed {
    fn forward_rows(&self, latent: &Tensor, rows: Range<usize>) -> Result<Tensor> {
        Ok(xfuser_layers::embeddings::PatchEmbed::forward_rows(
            self, latent, rows,
        )?)
    }
}

/// Ulysses splits the heads: its degree must divide them.
fn check_sp_heads(ctx: &ForwardContext, info: &BackboneInfo) -> Result<()> {
    match &ctx.sp {
        Some(sp) => sp.check_heads(info.num_attention_heads),
        None => Ok(()),
    }
}

/// Checks the latent's shape, (B, in_channels, H, W) with H and W multiples of the patch
/// size; returns its patch grid.
fn check_latent(latent: &Tensor, info: &BackboneInfo) -> Result<(usize, usize)> {
    let (_, channels, height, width) = latent.dims4()?;
    let p = info.patch_size;
    if channels != info.in_channels || !height.is_multiple_of(p) || !width.is_multiple_of(p) {
        return Err(Error::invalid(format!(
            "hidden_states {:?}: expected (B, {}, H, W) with H and W multiples of {p}",
            latent.dims(),
            info.in_channels
        )));
    }
    Ok((height / p, width / p))
}

/// The image tokens `embed` starts from and their grid: the whole latent's, or with `sp`
/// this rank's token rows padded to the split's common length. `embedding` is the model's
/// patch embedding, or why this stage has none.
pub fn embed_image<E: PatchRows>(
    embedding: Result<&E>,
    latent: &Tensor,
    ctx: &ForwardContext,
    info: &BackboneInfo,
    dtype: DType,
) -> Result<(Tensor, (usize, usize))> {
    check_sp_heads(ctx, info)?;
    let (rows, cols) = check_latent(latent, info)?;
    let latent = latent.to_dtype(dtype)?;
    match &ctx.sp {
        None => Ok((embedding?.forward_rows(&latent, 0..rows)?, (rows, cols))),
        Some(sp) => Ok((
            embed_sp_slice(embedding, &latent, sp, info)?,
            (sp.patch().token_rows.len(), cols),
        )),
    }
}

/// This sp rank's tokens of the (B, C, H, W) latent: its token rows of the patch grid, then
/// zero padding up to `sp.padded_len()`: (B, padded_len, D). The split is normally of the
/// whole grid (`InputMetadata::full`); a split of some of its rows (a PipeFusion patch) makes
/// the forward return those rows only.
fn embed_sp_slice<E: PatchRows>(
    embedding: Result<&E>,
    latent: &Tensor,
    sp: &SpContext,
    info: &BackboneInfo,
) -> Result<Tensor> {
    let (batch, _, height, width) = latent.dims4()?;
    let p = info.patch_size;
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
    let embedding = embedding?;
    embedding.check_grid((grid_rows, cols), latent.device())?;
    let slice = sp.slice();
    if slice.token_rows.is_empty() {
        let dim = info.num_attention_heads * info.attention_head_dim;
        return Ok(Tensor::zeros(
            (batch, slice.padded_len, dim),
            latent.dtype(),
            latent.device(),
        )?);
    }
    let tokens = embedding.forward_rows(latent, slice.token_rows.clone())?;
    Ok(tokens.pad_with_zeros(1, 0, slice.padding())?)
}

/// `embed_conditioning`'s image tokens: none, (B, 0, D), as the previous stage sends them,
/// and the grid (this sp rank's rows) they will have.
pub fn no_image_tokens(
    latent: &Tensor,
    ctx: &ForwardContext,
    info: &BackboneInfo,
    dtype: DType,
) -> Result<(Tensor, (usize, usize))> {
    check_sp_heads(ctx, info)?;
    let (batch, _, height, width) = latent.dims4()?;
    let p = info.patch_size;
    let rows = ctx
        .sp
        .as_ref()
        .map_or(height / p, |sp| sp.patch().token_rows.len());
    let dim = info.num_attention_heads * info.attention_head_dim;
    let hidden = Tensor::zeros((batch, 0, dim), dtype, latent.device())?;
    Ok((hidden, (rows, width / p)))
}

/// The blocks `layers` of the held `blocks` (the blocks `held` of the model's `num_layers`).
pub fn held_blocks<'a, T>(
    blocks: &'a [T],
    layers: &Range<usize>,
    held: &Range<usize>,
    num_layers: usize,
) -> Result<&'a [T]> {
    (layers.start >= held.start && layers.end <= held.end)
        .then(|| blocks.get(layers.start - held.start..layers.end - held.start))
        .flatten()
        .ok_or_else(|| {
            Error::invalid(format!(
                "blocks {layers:?} are not held here: this {} holds blocks {held:?} of \
                 {num_layers}",
                if held.len() == num_layers {
                    "model"
                } else {
                    "PipeFusion stage"
                },
            ))
        })
}

/// The attention processor of the blocks: the context's, or the serial one; a
/// sequence-parallel forward must bring a parallel one.
pub fn block_processor(ctx: &ForwardContext) -> Result<&dyn AttentionProcessor> {
    if ctx.sp.as_ref().is_some_and(|sp| sp.sp_group().size() > 1) && ctx.attention.is_none() {
        return Err(Error::invalid(
            "a sequence-parallel forward needs a parallel attention processor; build the \
             context with ForwardContext::sequence_parallel",
        ));
    }
    Ok(ctx.attention.as_deref().unwrap_or(&SerialAttention))
}

/// Checks that `head` has the tokens of the state's grid (with `sp`, this rank's padded
/// share).
pub fn check_head_tokens(state: &BlockState, ctx: &ForwardContext) -> Result<()> {
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
    Ok(())
}

/// The head's end: the projected tokens (B, N, p²·C) of a `grid`, with `sp` this rank's
/// padded share, all-gathered over the sp group with the padding dropped, then unpatchified
/// to (B, C, H, W). Gathering after the projection moves p²·C_out values per token instead
/// of D.
pub fn gather_and_unpatchify(
    hidden: Tensor,
    grid: (usize, usize),
    ctx: &ForwardContext,
    info: &BackboneInfo,
) -> Result<Tensor> {
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
        grid,
        info.patch_size,
        info.out_channels,
    )?)
}

/// The projected tokens (B, N, C) of the head, with `sp` this rank's padded share,
/// all-gathered over the sp group, real tokens first, padding dropped: (B, tokens, C). For a
/// model that unpatchifies its own way (Flux's unpacking); without `sp`, `hidden` itself.
pub fn gather_sp_tokens(hidden: Tensor, ctx: &ForwardContext) -> Result<Tensor> {
    Ok(match &ctx.sp {
        None => hidden,
        Some(sp) => {
            sp.sp_group()
                .all_gather(&hidden.contiguous()?, 1)?
                .narrow(1, 0, sp.num_tokens())?
        }
    })
}

/// (B, rows·cols, p·p·C) -> (B, C, rows·p, cols·p): each token's values are laid out
/// (p row, p column, channel), diffusers' einsum `nhwpqc->nchpwq`.
pub fn unpatchify(
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

/// The `n` chunks of a (B, n·D) adaLN modulation, each (B, 1, D) and contiguous (SD3, Flux).
pub fn modulation_chunks(emb: &Tensor, n: usize, dim: usize) -> candle_core::Result<Vec<Tensor>> {
    let batch = emb.dim(0)?;
    (0..n)
        .map(|i| {
            emb.narrow(1, i * dim, dim)?
                .reshape((batch, 1, dim))?
                .contiguous()
        })
        .collect()
}

/// LayerNorm without affine, eps 1e-6 (SD3's and Flux's adaLN norms), then
/// `·(1 + scale) + shift`, in one pass.
pub fn norm_modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    kernels::layer_norm_modulate(xs, shift, scale, 1e-6)
}

/// The whole (serial) model or stage through a model's tensor-parallel constructor: every
/// split layer read whole from `vb` (`TpRank::serial()`), for the `new` / `new_stage`
/// constructors, which speak candle's error type.
pub fn serial_shard<C, M>(
    cfg: &C,
    vb: VarBuilder,
    stage: Option<&PipelineStage>,
    new_shard: impl FnOnce(&C, VarBuilder, SplitWeights, TpRank, Option<&PipelineStage>) -> Result<M>,
) -> candle_core::Result<M> {
    let split = SplitWeights::VarBuilder(vb.clone());
    new_shard(cfg, vb, split, TpRank::serial(), stage).map_err(|e| match e {
        Error::Candle(e) => e,
        e => candle_core::Error::Msg(e.to_string()),
    })
}

/// Column-parallel layers that read the same input as one matrix product: their local
/// weights stacked (as [`kernels::gemm_friendly_weight`]) and their bias slices joined.
pub fn fuse_columns(ls: &[&ColumnParallelLinear]) -> Result<(Tensor, Option<Tensor>)> {
    let w = Tensor::cat(&ls.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
    let w = kernels::gemm_friendly_weight(&w)?;
    let b = match ls.iter().map(|l| l.bias()).collect::<Option<Vec<_>>>() {
        Some(bs) => Some(Tensor::cat(&bs, 0)?),
        None => None,
    };
    Ok((w, b))
}

/// The sum over the tp group of a split layer's partial products (None: the whole model on
/// this rank, the partial is the output).
pub fn tp_all_reduce(partial: Tensor, tp: Option<&ProcessGroup>) -> Result<Tensor> {
    match tp {
        Some(group) => group.all_reduce_sum(&partial),
        None => Ok(partial),
    }
}

/// [`tp_all_reduce`] of the image and text streams' partial products, (B, N, D) and (B, L, D),
/// in one all-reduce: joined along the sequence, reduced, cut apart again. One collective
/// instead of two, and the same bytes, so the cost model counts (B, N + L, D) per pair.
pub fn tp_all_reduce_pair(
    image: Tensor,
    text: Tensor,
    tp: Option<&ProcessGroup>,
) -> Result<(Tensor, Tensor)> {
    let Some(group) = tp else {
        return Ok((image, text));
    };
    let n = image.dim(1)?;
    let l = text.dim(1)?;
    let sum = group.all_reduce_sum(&Tensor::cat(&[&image, &text], 1)?)?;
    // Contiguous parts keep the fused residual kernels on their fast path.
    Ok((
        sum.narrow(1, 0, n)?.contiguous()?,
        sum.narrow(1, n, l)?.contiguous()?,
    ))
}

/// A tensor-parallel degree must give every rank whole heads (and so divide the hidden and
/// feed-forward sizes too).
pub fn check_tp_heads(class_name: &str, heads: usize, tp: TpRank) -> Result<()> {
    if tp.size == 0 || !heads.is_multiple_of(tp.size) {
        return Err(Error::invalid(format!(
            "--tensor-parallel-degree {} does not divide the {heads} attention heads \
             (num_attention_heads) of {class_name}: every rank must hold whole heads",
            tp.size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn held_blocks_are_the_requested_slice() {
        let blocks = [10, 11, 12];
        assert_eq!(
            held_blocks(&blocks, &(3..5), &(2..5), 6).unwrap(),
            &[11, 12]
        );
        assert!(held_blocks(&blocks, &(3..3), &(2..5), 6)
            .unwrap()
            .is_empty());
        let err = held_blocks(&blocks, &(1..3), &(2..5), 6)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "blocks 1..3 are not held here: this PipeFusion stage holds blocks 2..5 of 6"
            ),
            "{err}"
        );
        let err = held_blocks(&blocks, &(0..4), &(0..3), 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("this model holds blocks 0..3 of 3"), "{err}");
    }
}
