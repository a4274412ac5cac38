//! PipeFusion (<https://arxiv.org/abs/2405.14430>, xDiT's `--pipefusion_parallel_degree`): the
//! denoising loop of one rank of a pipeline of P stages, each holding a contiguous range of
//! the transformer's blocks.
//!
//! - **Warmup** ([`sync_pipeline`]): the first `warmup_steps` steps run on the whole image,
//!   stage after stage: stage 0 embeds, each stage runs its blocks and sends the activations
//!   to the next, the last stage runs the head and the scheduler step and sends the next
//!   step's model input back to stage 0. Attention is exact, and it fills every layer's K/V
//!   buffer (see `xfuser_layers::pipefusion_attention`).
//! - **Pipelined steps** ([`async_pipeline`]): the image is cut into M patches of token rows;
//!   for each step and patch, stage 0 embeds the patch, each stage runs its blocks on it with
//!   self-attention over the stale K/V buffers (the patch's rows fresh) and posts a
//!   non-blocking send to the next stage before it moves to the next patch, so that stage s
//!   works on patch m while stage s+1 works on patch m−1. The last stage runs the head on the
//!   patch and steps the scheduler on it with the patch's own state (the whole image's
//!   multistep history restricted to the patch's rows at the end of warmup), and sends the
//!   patch's next model input back to stage 0.
//!
//! Between stages travel the image tokens, and the text stream when the blocks update it
//! (joint attention, [`BackboneInfo::updates_text_stream`]: SD3, Flux; a patch's text stream
//! is the one its own forward made, so the text is fresh for every patch). Everything else
//! (the timestep embedding, the caption projection, the text mask, and the text stream of a
//! model whose blocks only read it) every stage computes itself from the conditioning every
//! rank holds ([`Backbone::embed_conditioning`]), as xDiT does.
//!
//! CFG parallel, sequence parallelism and data parallelism compose on the rank mesh: a pp
//! group is the stages of one (dp, cfg, sp) position; the cfg all-gather of the noise
//! predictions happens on the last stage, per patch; the sp ranks of a stage split each patch
//! (the attention processor exchanges inside it) and the head gathers the patch on every sp
//! rank of the last stage.
//!
//! # Communication (what the pp group's byte counters measure)
//!
//! With B′ the model batch (2B with serial CFG, B otherwise), T the tokens an sp rank holds
//! for the whole image (`InputMetadata::full`'s padded length per sp rank, which equals the
//! sum of its padded lengths over the patches), hs = H·Dh the hidden size and e the element
//! size, in every step a stage s < P−1 sends B′·T·hs·e bytes to stage s+1 (one message in a
//! warmup step, M in a pipelined one) and receives as much from s−1 (s > 0); the last stage
//! sends the next model input, B·C·h·w·e bytes (the latent), to stage 0 after every step but
//! the last. So a middle stage moves 2·p·hs·e bytes per step with p = B′·T: the cost model's
//! 2·p·hs, independent of the number of layers. A model that updates its text stream also
//! sends the B′·L·D_text text stream with every message (once per patch).

use std::sync::Arc;

use candle_core::Tensor;
use xfuser_core::backbone::{
    Backbone, BackboneInfo, BackboneInputs, BlockState, Conditioning, ForwardContext, SpContext,
};
use xfuser_core::distributed::{
    InputMetadata, Patch, ProcessGroup, RankContext, RecvHandle, SendHandle,
};
use xfuser_core::random::Generator;
use xfuser_core::scheduler::{Scheduler, SchedulerState};
use xfuser_core::{Error, Result};
use xfuser_layers::pipefusion_attention::PipeFusionAttention;

use crate::denoise::{
    apply_guidance, cfg_batch, drop_learned_sigma, schedule, to_latents_dtype, CfgBatch, Guidance,
};

/// What a PipeFusion rank runs with.
pub struct PipeFusionConfig<'a> {
    /// This stage's part of the transformer (it must hold this stage's blocks).
    pub backbone: &'a dyn Backbone,
    pub scheduler: &'a dyn Scheduler,
    pub rank: &'a RankContext,
    /// The patch table of this input shape (for this rank's sp degree).
    pub metadata: &'a InputMetadata,
    /// Steps run synchronously on the whole image first (≥ 1).
    pub warmup_steps: usize,
    /// Test aid: patches attend to zeros instead of stale K/V.
    pub zero_stale_kv: bool,
}

/// The forward contexts of one rank: the whole image's and each patch's, their PipeFusion
/// processors sharing one set of K/V buffers.
struct StageContexts {
    whole: ForwardContext,
    patches: Vec<ForwardContext>,
}

impl StageContexts {
    fn new(rank: &RankContext, metadata: &InputMetadata, zero_stale: bool) -> Result<Self> {
        let sp_whole = SpContext::from_rank(rank, metadata.full.clone())?;
        let processor = PipeFusionAttention::new(&sp_whole)?.with_zeroed_stale(zero_stale);
        let patches = metadata
            .patches
            .iter()
            .map(|patch| {
                let sp = SpContext::from_rank(rank, patch.clone())?;
                Ok(ForwardContext {
                    attention: Some(Arc::new(processor.for_patch(&sp)?)),
                    sp: Some(sp),
                    tp: None,
                }
                .with_tp(Some(rank.tp_group().clone())))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            whole: ForwardContext {
                attention: Some(Arc::new(processor)),
                sp: Some(sp_whole),
                tp: None,
            }
            .with_tp(Some(rank.tp_group().clone())),
            patches,
        })
    }
}

/// `tensor` with the rows `rows` of dim 2 replaced by `part`.
fn replace_rows(tensor: &Tensor, rows: std::ops::Range<usize>, part: &Tensor) -> Result<Tensor> {
    let total = tensor.dim(2)?;
    let mut parts = Vec::with_capacity(3);
    if rows.start > 0 {
        parts.push(tensor.narrow(2, 0, rows.start)?);
    }
    parts.push(part.clone());
    if rows.end < total {
        parts.push(tensor.narrow(2, rows.end, total - rows.end)?);
    }
    Ok(Tensor::cat(&parts, 2)?)
}

fn latent_rows(tensor: &Tensor, patch: &Patch) -> Result<Tensor> {
    let rows = &patch.latent_rows;
    Ok(tensor.narrow(2, rows.start, rows.len())?)
}

/// The whole image's scheduler state restricted to `patch`'s latent rows: what the patch's own
/// multistep history starts from after warmup.
fn patch_state(state: &SchedulerState, patch: &Patch) -> Result<SchedulerState> {
    let model_outputs = state
        .model_outputs
        .iter()
        .map(|t| latent_rows(t, patch))
        .collect::<Result<Vec<_>>>()?;
    Ok(SchedulerState {
        step_index: state.step_index,
        model_outputs,
        lower_order_nums: state.lower_order_nums,
    })
}

/// One rank's pipeline: its stage's position, the text it conditions on, and what the first
/// and last stages keep between steps.
struct Stage<'a> {
    config: &'a PipeFusionConfig<'a>,
    pp: &'a ProcessGroup,
    cfg_group: Option<&'a ProcessGroup>,
    guidance: &'a Guidance,
    contexts: StageContexts,
    conditioning: Conditioning,
    /// Whether the text stream travels with the image tokens.
    send_text: bool,
    /// Serial CFG: the model batch is the latents twice.
    doubled: bool,
    /// (B′, C, H, W): the model input's shape, which non-first stages embed nothing from but
    /// read the batch and size of.
    shape_carrier: Tensor,
    /// First stage: the current model input (scaled, not doubled), its patches replaced as
    /// they come back from the last stage.
    model_input: Tensor,
    /// Last stage: the latents of the whole image (warmup) or of each patch.
    latents: Vec<Tensor>,
    /// Last stage: the scheduler state of the whole image (warmup) or of each patch.
    states: Vec<SchedulerState>,
    sends: Vec<SendHandle>,
}

impl<'a> Stage<'a> {
    fn index(&self) -> usize {
        self.pp.index()
    }

    fn is_first(&self) -> bool {
        self.index() == 0
    }

    fn is_last(&self) -> bool {
        self.index() + 1 == self.pp.size()
    }

    fn model_batch(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if self.doubled {
            Tensor::cat(&[x, x], 0)?
        } else {
            x.clone()
        })
    }

    fn inputs<'t>(&'t self, hidden: &'t Tensor, timestep: &'t Tensor) -> BackboneInputs<'t> {
        BackboneInputs {
            hidden_states: hidden,
            timestep,
            conditioning: &self.conditioning,
        }
    }

    /// The state entering this stage's blocks: embedded here (first stage) or received from
    /// the previous stage, with the conditioning computed here.
    fn enter(
        &self,
        t: f64,
        ctx: &ForwardContext,
        received: Option<Incoming>,
    ) -> Result<BlockState> {
        let batch = self.shape_carrier.dim(0)?;
        let timestep = Tensor::full(t as f32, batch, self.shape_carrier.device())?;
        if self.is_first() {
            let input = self.model_batch(&self.model_input)?;
            return self
                .config
                .backbone
                .embed(&self.inputs(&input, &timestep), ctx);
        }
        let received = match received {
            Some(handle) => handle,
            None => self.post_receive(self.index() - 1)?,
        };
        let mut state = self
            .config
            .backbone
            .embed_conditioning(&self.inputs(&self.shape_carrier, &timestep), ctx)?;
        let (hidden, text) = received.wait()?;
        state.hidden = hidden;
        if text.is_some() {
            state.encoder = text;
        }
        Ok(state)
    }

    /// Posts the receives of one message from stage `source`: the image tokens, and the text
    /// stream when it travels too. The last stage's messages to stage 0 are latents only.
    fn post_receive(&self, source: usize) -> Result<Incoming> {
        let hidden = self.pp.irecv(source)?;
        let text = if self.send_text && source + 1 == self.index() {
            Some(self.pp.irecv(source)?)
        } else {
            None
        };
        Ok(Incoming { hidden, text })
    }

    /// Runs this stage's blocks on `state` and passes the result on: to the next stage, or,
    /// on the last stage, through the head, guidance and the scheduler step of `slot`
    /// (the whole image or patch `slot`). Returns the new latents of `slot` (last stage).
    fn run_blocks_and_pass_on(
        &mut self,
        state: BlockState,
        ctx: &ForwardContext,
        slot: usize,
        generator: Option<&mut Generator>,
    ) -> Result<Option<Tensor>> {
        let layers = self.config.backbone.held_layers();
        let state = self.config.backbone.blocks(state, layers, ctx)?;
        if !self.is_last() {
            let next = self.index() + 1;
            let handle = self.pp.isend(&state.hidden.contiguous()?, next)?;
            self.sends.push(handle);
            if self.send_text {
                let text = state.text(self.config.backbone.info().class_name)?;
                let handle = self.pp.isend(&text.contiguous()?, next)?;
                self.sends.push(handle);
            }
            return Ok(None);
        }
        let prediction = self.config.backbone.head(state, ctx)?;
        let prediction = match self.cfg_group {
            // (B, ...) on each cfg rank -> (2B, ...): negative half, then positive.
            Some(group) => group.all_gather(&prediction, 0)?,
            None => prediction,
        };
        let latents = &self.latents[slot];
        let prediction = to_latents_dtype(&prediction, latents)?;
        let noise = apply_guidance(&prediction, self.guidance, latents.dim(0)?)?;
        let noise = drop_learned_sigma(&noise, latents.dim(1)?)?;
        let new = self
            .config
            .scheduler
            .step(&mut self.states[slot], &noise, latents, generator)?;
        self.latents[slot] = new.clone();
        Ok(Some(new))
    }

    /// Last stage: sends the next step's model input of `slot` (its latents, scaled) to stage 0.
    fn send_next_input(&mut self, slot: usize) -> Result<()> {
        let input = self
            .config
            .scheduler
            .scale_model_input(&self.states[slot], &self.latents[slot])?;
        let handle = self.pp.isend(&input.contiguous()?, 0)?;
        self.sends.push(handle);
        Ok(())
    }

    fn wait_sends(&mut self) -> Result<()> {
        for handle in self.sends.drain(..) {
            handle.wait()?;
        }
        Ok(())
    }
}

/// One message from the previous stage, not yet arrived.
struct Incoming {
    hidden: RecvHandle,
    text: Option<RecvHandle>,
}

impl Incoming {
    fn wait(self) -> Result<(Tensor, Option<Tensor>)> {
        let hidden = self.hidden.wait()?;
        let text = self.text.map(RecvHandle::wait).transpose()?;
        Ok((hidden, text))
    }
}

/// Whether the text stream travels between the stages of `info`'s model.
fn sends_text(info: &BackboneInfo) -> bool {
    info.updates_text_stream
}

/// One warmup step `i` of `steps` on the whole image, stage after stage.
pub fn sync_pipeline(
    stage: &mut StageHandle<'_>,
    i: usize,
    steps: usize,
    generator: Option<&mut Generator>,
) -> Result<()> {
    let stage = &mut stage.0;
    let t = stage.config.scheduler.timesteps()[i];
    let last = stage.pp.size() - 1;
    if stage.is_first() && i > 0 {
        stage.model_input = stage.pp.recv(last)?;
    }
    let ctx = stage.contexts.whole.clone();
    let state = stage.enter(t, &ctx, None)?;
    stage.run_blocks_and_pass_on(state, &ctx, 0, generator)?;
    if stage.is_last() && i + 1 < steps {
        if i + 1 < stage.config.warmup_steps {
            stage.send_next_input(0)?;
        } else {
            // The pipelined steps start: each patch continues with its rows of the whole
            // image's latents and multistep history.
            let patches = &stage.config.metadata.patches;
            let (latents, state) = (&stage.latents[0], &stage.states[0]);
            stage.latents = patches
                .iter()
                .map(|p| latent_rows(latents, p))
                .collect::<Result<_>>()?;
            stage.states = patches
                .iter()
                .map(|p| patch_state(state, p))
                .collect::<Result<_>>()?;
            for m in 0..patches.len() {
                stage.send_next_input(m)?;
            }
        }
    }
    stage.wait_sends()
}

/// One pipelined step `i` of `steps`, patch by patch; receives for the next patch are posted
/// before the current one is computed.
pub fn async_pipeline(
    stage: &mut StageHandle<'_>,
    i: usize,
    steps: usize,
    mut generator: Option<&mut Generator>,
) -> Result<()> {
    let stage = &mut stage.0;
    if i == 0 {
        return Err(Error::invalid(
            "PipeFusion: the first step must be a warmup step on the whole image",
        ));
    }
    let t = stage.config.scheduler.timesteps()[i];
    let num_patches = stage.contexts.patches.len();
    let source = if stage.is_first() {
        stage.pp.size() - 1
    } else {
        stage.index() - 1
    };
    let mut next = Some(stage.post_receive(source)?);
    for m in 0..num_patches {
        let received = next.take().expect("posted");
        if m + 1 < num_patches {
            next = Some(stage.post_receive(source)?);
        }
        let ctx = stage.contexts.patches[m].clone();
        let state = if stage.is_first() {
            let patch = &stage.config.metadata.patches[m];
            let (part, _) = received.wait()?;
            stage.model_input = replace_rows(&stage.model_input, patch.latent_rows.clone(), &part)?;
            stage.enter(t, &ctx, None)?
        } else {
            stage.enter(t, &ctx, Some(received))?
        };
        stage.run_blocks_and_pass_on(state, &ctx, m, generator.as_deref_mut())?;
        if stage.is_last() && i + 1 < steps {
            stage.send_next_input(m)?;
        }
    }
    stage.wait_sends()
}

/// A rank's pipeline between steps (see [`sync_pipeline`] and [`async_pipeline`]).
pub struct StageHandle<'a>(Stage<'a>);

/// Runs every step of the schedule on this rank's stage from `latents` (already scaled by
/// `init_noise_sigma`; every rank holds them). Returns the final latents on the last stage,
/// None on the others. `on_step(i, n)` is called after each step.
pub fn denoise_pipefusion(
    config: &PipeFusionConfig<'_>,
    latents: Tensor,
    guidance: &Guidance,
    mut generator: Option<&mut Generator>,
    on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Option<Tensor>> {
    let rank = config.rank;
    let pp = rank.pp_group();
    if pp.size() < 2 {
        return Err(Error::invalid(
            "PipeFusion needs --pipefusion-parallel-degree ≥ 2",
        ));
    }
    if config.warmup_steps == 0 {
        return Err(Error::invalid(
            "PipeFusion needs --warmup-steps ≥ 1: the first step fills the K/V buffers",
        ));
    }
    let scheduler = config.scheduler;
    let steps = schedule(scheduler)?.len();
    let CfgBatch {
        cfg_group,
        doubled,
        conditioning,
    } = cfg_batch(guidance, Some(rank.cfg_group()))?;
    let state0 = scheduler.new_state();
    let model_input = scheduler.scale_model_input(&state0, &latents)?;
    let shape_carrier = if doubled {
        Tensor::cat(&[&model_input, &model_input], 0)?
    } else {
        model_input.clone()
    };
    let held = config.backbone.held_layers();
    if held.is_empty() {
        return Err(Error::invalid(format!(
            "PipeFusion stage {} holds no transformer block",
            pp.index()
        )));
    }
    let mut handle = StageHandle(Stage {
        config,
        pp,
        cfg_group,
        guidance,
        contexts: StageContexts::new(rank, config.metadata, config.zero_stale_kv)?,
        conditioning,
        send_text: sends_text(config.backbone.info()),
        doubled,
        shape_carrier,
        model_input,
        latents: vec![latents],
        states: vec![state0],
        sends: Vec::new(),
    });
    for i in 0..steps {
        if i < config.warmup_steps {
            sync_pipeline(&mut handle, i, steps, generator.as_deref_mut())?;
        } else {
            async_pipeline(&mut handle, i, steps, generator.as_deref_mut())?;
        }
        on_step(i + 1, steps)?;
    }
    let stage = handle.0;
    if !stage.is_last() {
        return Ok(None);
    }
    Ok(Some(if stage.latents.len() == 1 {
        stage.latents[0].clone()
    } else {
        Tensor::cat(&stage.latents, 2)?
    }))
}
