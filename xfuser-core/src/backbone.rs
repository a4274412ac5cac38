//! The contract between a diffusion-transformer backbone and the runtime that parallelizes it:
//! a forward pass in three parts, `embed` (patchify + conditioning; first pipeline stage),
//! `blocks(range)` (the transformer blocks a stage owns) and `head` (final norm + unpatchify;
//! last stage). The runtime can thus run any registered backbone stage by stage and patch by
//! patch without knowing its insides.
//!
//! What a model is conditioned on travels as [`Conditioning`] (named batch-first tensors the
//! runtime splits and joins without reading them); what flows between the parts is a
//! [`BlockState`] with the image tokens, an optional text stream the blocks may update, and
//! the model's own per-forward tensors. docs/model-contract.md describes the whole contract.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;

use crate::attention::AttentionProcessor;
use crate::distributed::{Patch, ProcessGroup, RankContext, SpSlice};
use crate::{Error, Result};

/// Per-sample tensors a backbone is conditioned on, by name, every one batch-first (dim 0 is
/// the batch row). The runtime moves them without knowing what they mean: it takes a
/// data-parallel group's rows, joins the negative and positive halves of classifier-free
/// guidance along the batch, and hands them to the backbone, which reads the names it knows
/// ([`Conditioning::require`] names the missing one in its error). Names shared by several
/// models are the constants of [`names`]; a model may define its own (PixArt-α's
/// `resolution` and `aspect_ratio`).
#[derive(Debug, Clone, Default)]
pub struct Conditioning {
    tensors: BTreeMap<String, Tensor>,
}

/// The conditioning names the pipelines of more than one model use, as diffusers names the
/// transformer arguments.
pub mod names {
    /// (B, L, text_dim) text-encoder output.
    pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
    /// (B, L), 1 where a text token is attended to, 0 where it is padding.
    pub const ENCODER_ATTENTION_MASK: &str = "encoder_attention_mask";
    /// (B, pooled_dim) pooled text projections (SD3, Flux).
    pub const POOLED_PROJECTIONS: &str = "pooled_projections";
    /// (B,) an embedded guidance value (Flux-dev).
    pub const GUIDANCE: &str = "guidance";
    /// (B,) class labels (class-conditional DiT).
    pub const CLASS_LABELS: &str = "class_labels";
}

impl Conditioning {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the tensor `name`; builder style.
    pub fn with(mut self, name: impl Into<String>, tensor: Tensor) -> Self {
        self.insert(name, tensor);
        self
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor `name`, or an error that says `model` needs it.
    pub fn require(&self, name: &str, model: &str) -> Result<&Tensor> {
        self.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "{model} needs the conditioning input `{name}`, which the pipeline did not give \
                 (given: {})",
                self.describe()
            ))
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn describe(&self) -> String {
        if self.tensors.is_empty() {
            return "none".into();
        }
        self.names().collect::<Vec<_>>().join(", ")
    }

    /// The rows `start..start + len` of every tensor.
    pub fn narrow_batch(&self, start: usize, len: usize) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.narrow(0, start, len)?)))
            .collect::<Result<_>>()?;
        Ok(Self { tensors })
    }

    /// The parts joined along the batch, name by name; every part must hold the same names.
    pub fn cat_batch(parts: &[&Conditioning]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Ok(Self::default());
        };
        let mut tensors = BTreeMap::new();
        for (name, _) in first.tensors.iter() {
            let all = parts
                .iter()
                .map(|p| {
                    p.get(name).ok_or_else(|| {
                        Error::invalid(format!(
                            "conditioning halves differ: one has `{name}`, another only {}",
                            p.describe()
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            tensors.insert(name.clone(), Tensor::cat(&all, 0)?);
        }
        if parts.iter().any(|p| p.tensors.len() != first.tensors.len()) {
            return Err(Error::invalid(format!(
                "conditioning halves differ: their names are not all {}",
                first.describe()
            )));
        }
        Ok(Self { tensors })
    }
}

/// Inputs of one denoising forward.
#[derive(Debug, Clone, Copy)]
pub struct BackboneInputs<'a> {
    /// (B, C, H, W) noisy latents, in image layout whatever the model's token layout (a
    /// model that packs patches, as Flux does, packs them in `embed`).
    pub hidden_states: &'a Tensor,
    /// (B,) diffusion timesteps (one value is repeated over the batch), on the scale the
    /// scheduler gives them.
    pub timestep: &'a Tensor,
    /// Everything else the model is conditioned on.
    pub conditioning: &'a Conditioning,
}

/// The activations that flow between `embed`, the blocks and `head`.
#[derive(Debug, Clone)]
pub struct BlockState {
    /// (B, N, D) image tokens (a sequence-parallel rank's slice, a PipeFusion patch's rows).
    pub hidden: Tensor,
    /// (B, L, D_text) the text stream: read by cross-attention (PixArt), or attended to
    /// jointly and updated by the blocks (SD3, Flux; see [`BackboneInfo::updates_text_stream`]).
    /// Whole on every sequence-parallel rank. None for a model without text.
    pub encoder: Option<Tensor>,
    /// Additive bias on the text keys, broadcastable to (B, H, N, L); None when nothing is
    /// masked.
    pub encoder_bias: Option<Tensor>,
    /// The model's own per-forward tensors that blocks and head read (PixArt: adaLN-single's
    /// outputs; SD3: the combined timestep/text embedding). The runtime never reads them.
    pub conditioning: Conditioning,
    /// The latent token grid (rows, columns) in patches, for unpatchify.
    pub grid: (usize, usize),
}

impl BlockState {
    /// The model-own conditioning tensor `name` that `embed` stored.
    pub fn conditioning(&self, name: &str) -> Result<&Tensor> {
        self.conditioning.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "the block state lacks `{name}`: it was not made by this model's embed"
            ))
        })
    }

    /// The text stream, or an error naming `model`, which needs one.
    pub fn text(&self, model: &str) -> Result<&Tensor> {
        self.encoder
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{model}: the block state has no text stream")))
    }
}

/// Static facts about a backbone that the runtime validates parallel configurations against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackboneInfo {
    pub class_name: &'static str,
    /// Transformer blocks, the unit PipeFusion stages split.
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: usize,
    /// Latent side length the model was trained at (diffusers' `sample_size`).
    pub sample_size: usize,
    /// Width of the text embeddings the model takes (`encoder_hidden_states`' last dim).
    pub caption_channels: usize,
    /// Whether the blocks update the text stream (joint attention: SD3, Flux). PipeFusion then
    /// passes the text stream from stage to stage together with the image tokens; otherwise
    /// every stage recomputes it from the inputs.
    pub updates_text_stream: bool,
}

/// How a forward is run: which attention processor does self-attention and, for sequence
/// parallelism, how the image tokens split over the sp ranks. The default is serial.
#[derive(Clone, Default)]
pub struct ForwardContext {
    pub attention: Option<Arc<dyn AttentionProcessor>>,
    /// Set for a sequence-parallel forward: `embed` then yields only this rank's tokens
    /// (`sp.slice()`, padded to `sp.padded_len()`), the processor exchanges what attention
    /// needs, and `head` gathers the tokens so that every sp rank returns the whole output.
    pub sp: Option<SpContext>,
    /// Set for a tensor-parallel forward (`--tensor-parallel-degree` > 1): the rank's tp group,
    /// over which a backbone loaded as one shard ([`crate::registry::LoadOptions::tp`])
    /// all-reduces the outputs of its split layers. A backbone loaded as a shard refuses a
    /// forward without it.
    pub tp: Option<ProcessGroup>,
}

impl ForwardContext {
    /// A sequence-parallel forward whose self-attention is the processor registered as
    /// `processor` ("ulysses", "ring", "usp", ...; see [`SpContext::method_name`]), built for
    /// `sp`. Build one per input shape: the processor keeps the split's lengths.
    pub fn sequence_parallel(processor: &str, sp: SpContext) -> Result<Self> {
        let attention = crate::registry::build_attention_processor(processor, &sp)?;
        Ok(Self {
            attention: Some(attention),
            sp: Some(sp),
            tp: None,
        })
    }

    /// This context with the tensor-parallel group `tp` (None, or a group of 1: none).
    pub fn with_tp(mut self, tp: Option<ProcessGroup>) -> Self {
        self.tp = tp.filter(|g| g.size() > 1);
        self
    }

    /// True for a forward on one rank with the serial attention and no tensor parallelism:
    /// its rows may be computed in independent streams, since nothing exchanges with peers
    /// once per forward.
    pub fn is_serial(&self) -> bool {
        self.sp.is_none() && self.attention.is_none() && self.tp.is_none()
    }
}

/// Sequence parallelism as one rank sees it in one forward: its sp group and the two groups
/// that split it (Ulysses inside, Ring across, `sp = ulysses + U·ring`), and the split of the
/// image's tokens (or of one PipeFusion patch) over the sp ranks, from the runtime state.
///
/// The padded layout (see [`crate::distributed::runtime_state`]): every sp rank holds
/// `padded_len()` tokens, its real ones first; gathered in sp order the sequence is the
/// `num_tokens()` real tokens, then padding. Attention must ignore keys at gathered positions
/// `≥ num_tokens()`; the outputs of padded queries are dropped by `head`.
#[derive(Debug, Clone)]
pub struct SpContext {
    sp_group: ProcessGroup,
    ulysses_group: ProcessGroup,
    ring_group: ProcessGroup,
    patch: Patch,
}

impl SpContext {
    /// Checks that the groups form the sp mesh (sizes U·R, this rank at `u + U·r`) and that
    /// `patch` splits over that many ranks.
    pub fn new(
        sp_group: ProcessGroup,
        ulysses_group: ProcessGroup,
        ring_group: ProcessGroup,
        patch: Patch,
    ) -> Result<Self> {
        let (u, r) = (ulysses_group.size(), ring_group.size());
        if sp_group.size() != u * r
            || sp_group.index() != ulysses_group.index() + u * ring_group.index()
        {
            return Err(Error::invalid(format!(
                "sp group {} (index {}) is not ulysses group {} (index {}) × ring group {} \
                 (index {})",
                sp_group.name(),
                sp_group.index(),
                ulysses_group.name(),
                ulysses_group.index(),
                ring_group.name(),
                ring_group.index()
            )));
        }
        if patch.slices.len() != sp_group.size() {
            return Err(Error::invalid(format!(
                "the token split has {} sp slices but the sp degree is {}: the runtime state \
                 was computed for another mesh",
                patch.slices.len(),
                sp_group.size()
            )));
        }
        Ok(Self {
            sp_group,
            ulysses_group,
            ring_group,
            patch,
        })
    }

    /// The context of rank `ctx` for the split `patch` (`InputMetadata::full` for a whole
    /// image).
    pub fn from_rank(ctx: &RankContext, patch: Patch) -> Result<Self> {
        Self::new(
            ctx.sp_group().clone(),
            ctx.ulysses_group().clone(),
            ctx.ring_group().clone(),
            patch,
        )
    }

    pub fn sp_group(&self) -> &ProcessGroup {
        &self.sp_group
    }

    pub fn ulysses_group(&self) -> &ProcessGroup {
        &self.ulysses_group
    }

    pub fn ring_group(&self) -> &ProcessGroup {
        &self.ring_group
    }

    /// The split of the whole sequence over the sp ranks.
    pub fn patch(&self) -> &Patch {
        &self.patch
    }

    /// This rank's share of the tokens.
    pub fn slice(&self) -> &SpSlice {
        &self.patch.slices[self.sp_group.index()]
    }

    /// Tokens every sp rank holds, padding included.
    pub fn padded_len(&self) -> usize {
        self.slice().padded_len
    }

    /// Real tokens of the gathered sequence; gathered positions from here on are padding.
    pub fn num_tokens(&self) -> usize {
        self.patch.tokens.len
    }

    /// The processor name that fits the degrees: "serial", "ulysses", "ring" or "usp".
    pub fn method_name(&self) -> &'static str {
        match (self.ulysses_group.size() > 1, self.ring_group.size() > 1) {
            (false, false) => "serial",
            (true, false) => "ulysses",
            (false, true) => "ring",
            (true, true) => "usp",
        }
    }

    /// Ulysses gives each rank `heads / U` whole heads: U must divide them.
    pub fn check_heads(&self, num_attention_heads: usize) -> Result<()> {
        let u = self.ulysses_group.size();
        if !num_attention_heads.is_multiple_of(u) {
            return Err(Error::invalid(format!(
                "--ulysses-degree {u} does not divide the {num_attention_heads} attention heads \
                 of the model: Ulysses gives every rank whole heads"
            )));
        }
        Ok(())
    }
}

/// Which part of a backbone one PipeFusion stage holds: a contiguous range of blocks, plus
/// the patch embedding on the first stage and the head on the last. Loaders that honour it
/// (see [`crate::registry::LoadOptions::stage`]) read only those weights (and the small
/// conditioning modules every stage needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineStage {
    pub index: usize,
    pub num_stages: usize,
    /// Blocks per stage (`--attn-layer-num-for-pp`); None: an even split.
    pub layer_counts: Option<Vec<usize>>,
}

impl PipelineStage {
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.num_stages
    }

    /// The blocks of this stage in a model of `num_layers`.
    pub fn layers(&self, num_layers: usize) -> Result<Range<usize>> {
        let ranges = stage_layer_ranges(num_layers, self.num_stages, self.layer_counts.as_deref())?;
        ranges.get(self.index).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "pipeline stage {} of {}: no such stage",
                self.index, self.num_stages
            ))
        })
    }
}

/// The contiguous block ranges of `num_stages` pipeline stages: `counts` blocks each (they
/// must sum to `num_layers`), or an even split with the first `num_layers % num_stages`
/// stages one block more.
pub fn stage_layer_ranges(
    num_layers: usize,
    num_stages: usize,
    counts: Option<&[usize]>,
) -> Result<Vec<Range<usize>>> {
    if num_stages == 0 || num_stages > num_layers {
        return Err(Error::invalid(format!(
            "--pipefusion-parallel-degree {num_stages} does not fit the {num_layers} \
             transformer blocks: every stage needs at least one; use 1 to {num_layers}"
        )));
    }
    let counts: Vec<usize> = match counts {
        Some(c) => {
            let sum: usize = c.iter().sum();
            if c.len() != num_stages || sum != num_layers || c.contains(&0) {
                return Err(Error::invalid(format!(
                    "--attn-layer-num-for-pp {c:?} must give {num_stages} positive stage sizes \
                     summing to the model's {num_layers} transformer blocks (they sum to {sum})"
                )));
            }
            c.to_vec()
        }
        None => (0..num_stages)
            .map(|s| num_layers / num_stages + usize::from(s < num_layers % num_stages))
            .collect(),
    };
    let mut start = 0;
    Ok(counts
        .into_iter()
        .map(|n| {
            start += n;
            start - n..start
        })
        .collect())
}

pub trait Backbone: Send + Sync {
    fn info(&self) -> &BackboneInfo;

    /// The blocks this instance holds: all of them, or a PipeFusion stage's range.
    fn held_layers(&self) -> Range<usize> {
        0..self.info().num_layers
    }

    /// Bytes of the parameters this instance loaded, when it counts them (a PipeFusion stage
    /// holds about 1/P of the model).
    fn parameter_bytes(&self) -> Option<u64> {
        None
    }

    /// What `embed` computes besides the image tokens (conditioning, text, masks), for the
    /// PipeFusion stages after the first, whose image tokens come from the previous stage:
    /// the caller replaces the returned state's `hidden`. The default runs the whole `embed`;
    /// a backbone that loads stages without the patch embedding overrides it.
    fn embed_conditioning(
        &self,
        inputs: &BackboneInputs,
        ctx: &ForwardContext,
    ) -> Result<BlockState> {
        self.embed(inputs, ctx)
    }

    /// Patch embedding, positional embedding and conditioning of the whole input.
    fn embed(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<BlockState>;

    /// Runs the transformer blocks `layers` (indices into 0..num_layers) on `state`.
    fn blocks(
        &self,
        state: BlockState,
        layers: Range<usize>,
        ctx: &ForwardContext,
    ) -> Result<BlockState>;

    /// TeaCache's signal: the first block's input after its timestep modulation (diffusers'
    /// `norm1(hidden, emb)` of block 0, its first output), for the tokens `state` holds, as
    /// `embed` returned it. The step cache compares it between steps; the blocks are not run.
    /// None (the default): the model does not expose it, and TeaCache is refused for it with
    /// that reason.
    fn modulated_input(&self, state: &BlockState, ctx: &ForwardContext) -> Result<Option<Tensor>> {
        let _ = (state, ctx);
        Ok(None)
    }

    /// TeaCache's rescaling polynomial for this model (coefficients, highest power first),
    /// fitted by TeaCache's authors from the relative change of the modulated input to that of
    /// the model output; None (the default): the relative change is used as it is.
    fn teacache_coefficients(&self) -> Option<&'static [f64]> {
        None
    }

    /// Final norm, projection and unpatchify: (B, N, D) -> (B, out_channels, H, W).
    fn head(&self, state: BlockState, ctx: &ForwardContext) -> Result<Tensor>;

    /// The whole forward, as diffusers' `model(...)`. A serial forward of a batch of 2 or more
    /// on 2 or more threads runs as two concurrent halves ([`forward_in_two_streams`]).
    fn forward(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<Tensor> {
        if let Some(out) = forward_in_two_streams(self, inputs, ctx)? {
            return Ok(out);
        }
        self.forward_one_stream(inputs, ctx)
    }

    /// The whole forward as one stream of work: `embed`, every block, `head`.
    fn forward_one_stream(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<Tensor> {
        let state = self.embed(inputs, ctx)?;
        let state = self.blocks(state, 0..self.info().num_layers, ctx)?;
        self.head(state, ctx)
    }
}

/// The rows `start..start + len` of every batched input.
struct BatchRows {
    hidden_states: Tensor,
    timestep: Tensor,
    conditioning: Conditioning,
}

impl BatchRows {
    fn of(inputs: &BackboneInputs, start: usize, len: usize) -> Result<Self> {
        let timestep = match inputs.timestep.flatten_all()? {
            // One value stands for the whole batch.
            t if t.dim(0)? == 1 => t,
            t => t.narrow(0, start, len)?,
        };
        Ok(Self {
            hidden_states: inputs.hidden_states.narrow(0, start, len)?,
            timestep,
            conditioning: inputs.conditioning.narrow_batch(start, len)?,
        })
    }

    fn inputs(&self) -> BackboneInputs<'_> {
        BackboneInputs {
            hidden_states: &self.hidden_states,
            timestep: &self.timestep,
            conditioning: &self.conditioning,
        }
    }
}

/// A serial forward of a batch of B ≥ 2 rows on T ≥ 2 threads as two concurrent forwards of
/// B/2 and B − B/2 rows, each on a rayon pool of its own with T/2 and T − T/2 threads (and so
/// on, recursively, while both are ≥ 2). The rows of a batch never interact, so the result is
/// the one-stream forward's up to the rounding of the matrix products, whose blocking depends
/// on the row count. On 2 cores a PixArt-α forward of batch 2 takes about 0.9 × the one-stream
/// time: two single-threaded streams keep both cores busy without a fork/join per op
/// (docs/performance.md). None (the caller runs one stream) for a batch of 1, fewer than 2
/// threads, or a parallel forward (its processor exchanges with peers once per forward).
pub fn forward_in_two_streams<B: Backbone + ?Sized>(
    backbone: &B,
    inputs: &BackboneInputs,
    ctx: &ForwardContext,
) -> Result<Option<Tensor>> {
    let batch = inputs.hidden_states.dim(0)?;
    let threads = rayon::current_num_threads();
    if batch < 2 || threads < 2 || !ctx.is_serial() {
        return Ok(None);
    }
    let halves = [
        BatchRows::of(inputs, 0, batch / 2)?,
        BatchRows::of(inputs, batch / 2, batch - batch / 2)?,
    ];
    let (first, second) = in_two_streams(threads, |i| backbone.forward(&halves[i].inputs(), ctx))?;
    Ok(Some(Tensor::cat(&[first, second], 0)?))
}

/// Runs `work(0)` and `work(1)` concurrently, each on a rayon pool of its own with
/// `threads / 2` and `threads − threads / 2` threads (at least one), so that everything each
/// one runs in parallel stays on its share of the threads. A panic in either is resumed here.
pub fn in_two_streams<T: Send>(
    threads: usize,
    work: impl Fn(usize) -> Result<T> + Sync,
) -> Result<(T, T)> {
    let pool = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .thread_name(|i| format!("xfuser-stream-{i}"))
            .build()
            .map_err(|e| Error::invalid(format!("could not start {n} compute threads: {e}")))
    };
    let pools = [pool(threads / 2)?, pool(threads - threads / 2)?];
    let run = |i: usize| pools[i].install(|| work(i));
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| run(0));
        let second = run(1);
        let first = first
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (first, second)
    });
    Ok((first?, second?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_split_the_blocks() {
        assert_eq!(stage_layer_ranges(4, 2, None).unwrap(), vec![0..2, 2..4]);
        assert_eq!(
            stage_layer_ranges(28, 3, None).unwrap(),
            vec![0..10, 10..19, 19..28]
        );
        assert_eq!(
            stage_layer_ranges(4, 2, Some(&[3, 1])).unwrap(),
            vec![0..3, 3..4]
        );
        let msg = stage_layer_ranges(4, 2, Some(&[2, 1]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("summing to the model's 4"), "{msg}");
        assert!(stage_layer_ranges(2, 4, None).is_err());
        let stage = PipelineStage {
            index: 1,
            num_stages: 2,
            layer_counts: None,
        };
        assert!(stage.is_last() && !stage.is_first());
        assert_eq!(stage.layers(6).unwrap(), 3..6);
    }
}
