//! The denoising loop every pipeline shares: classifier-free guidance around a backbone,
//! stepped by a scheduler, as diffusers' pipelines run it.

use candle_core::Tensor;
use xfuser_core::backbone::{
    in_two_streams, Backbone, BackboneInputs, Conditioning, ForwardContext,
};
use xfuser_core::distributed::ProcessGroup;
use xfuser_core::random::Generator;
use xfuser_core::scheduler::Scheduler;
use xfuser_core::{Error, Result};

use crate::step_cache::StepCacher;

/// What the denoising loop conditions on: the backbone's conditioning for each side of
/// classifier-free guidance.
#[derive(Debug, Clone)]
pub struct Guidance {
    pub positive: Conditioning,
    /// Present exactly when the pipeline decided to use classifier-free guidance.
    pub negative: Option<Conditioning>,
    pub guidance_scale: f64,
}

impl Guidance {
    pub fn uses_cfg(&self) -> bool {
        self.negative.is_some()
    }

    /// The conditioning of batch rows `start..start + len` (a data-parallel group's share).
    pub fn narrow_batch(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            positive: self.positive.narrow_batch(start, len)?,
            negative: self
                .negative
                .as_ref()
                .map(|n| n.narrow_batch(start, len))
                .transpose()?,
            guidance_scale: self.guidance_scale,
        })
    }
}

/// Runs every step of `scheduler`'s schedule from `latents` (already scaled by
/// `init_noise_sigma`) and returns the final latents. `on_step(i, n)` is called after each step;
/// an error it returns stops the loop and is returned.
///
/// With `cfg_group` (CFG parallel, two ranks), member 0 runs the backbone on the negative
/// (unconditional) half only and member 1 on the positive half; the two noise predictions are
/// all-gathered in that order, so both ranks apply the same guidance and take the same step.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    backbone: &dyn Backbone,
    scheduler: &dyn Scheduler,
    latents: Tensor,
    guidance: &Guidance,
    ctx: &ForwardContext,
    cfg_group: Option<&ProcessGroup>,
    generator: Option<&mut Generator>,
    on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Tensor> {
    denoise_with_cache(
        backbone, scheduler, latents, guidance, ctx, cfg_group, generator, None, on_step,
    )
}

/// [`denoise`] with a step cache: every forward goes through `cache`, and serial CFG runs the
/// doubled batch in one forward so that both halves take the cache's decision together.
#[allow(clippy::too_many_arguments)]
pub fn denoise_with_cache(
    backbone: &dyn Backbone,
    scheduler: &dyn Scheduler,
    latents: Tensor,
    guidance: &Guidance,
    ctx: &ForwardContext,
    cfg_group: Option<&ProcessGroup>,
    mut generator: Option<&mut Generator>,
    mut cache: Option<&mut dyn StepCacher>,
    on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Tensor> {
    let timesteps = schedule(scheduler)?.to_vec();
    let CfgBatch {
        cfg_group,
        doubled,
        conditioning,
    } = cfg_batch(guidance, cfg_group)?;
    let latent_channels = latents.dim(1)?;
    let batch = latents.dim(0)?;
    let mut state = scheduler.new_state();
    let mut latents = latents;
    let streams = if doubled && cache.is_none() {
        CfgStreams::new(guidance, ctx)?
    } else {
        None
    };
    for (i, &t) in timesteps.iter().enumerate() {
        let prediction = match &streams {
            Some(streams) => {
                let model_input = scheduler.scale_model_input(&state, &latents)?;
                let timestep = Tensor::full(t as f32, batch, latents.device())?;
                streams.forward(backbone, &model_input, &timestep, ctx)?
            }
            None => {
                let model_input = if doubled {
                    Tensor::cat(&[&latents, &latents], 0)?
                } else {
                    latents.clone()
                };
                let model_input = scheduler.scale_model_input(&state, &model_input)?;
                let timestep = Tensor::full(t as f32, model_input.dim(0)?, latents.device())?;
                let inputs = BackboneInputs {
                    hidden_states: &model_input,
                    timestep: &timestep,
                    conditioning: &conditioning,
                };
                let prediction = match cache.as_deref_mut() {
                    Some(cache) => cache.forward(backbone, &inputs, ctx, i, timesteps.len())?,
                    None => backbone.forward(&inputs, ctx)?,
                };
                match cfg_group {
                    // (B, ...) on each rank -> (2B, ...): negative half, then positive.
                    Some(group) => group.all_gather(&prediction, 0)?,
                    None => prediction,
                }
            }
        };
        let prediction = to_latents_dtype(&prediction, &latents)?;
        let noise = apply_guidance(&prediction, guidance, batch)?;
        let noise = drop_learned_sigma(&noise, latent_channels)?;
        latents = scheduler.step(&mut state, &noise, &latents, generator.as_deref_mut())?;
        on_step(i + 1, timesteps.len())?;
    }
    Ok(latents)
}

/// The scheduler's timesteps; an error when there are none (set_timesteps was not called).
pub(crate) fn schedule(scheduler: &dyn Scheduler) -> Result<&[f64]> {
    let timesteps = scheduler.timesteps();
    if timesteps.is_empty() {
        return Err(Error::invalid(
            "the scheduler has no timesteps: call set_timesteps with at least one step",
        ));
    }
    Ok(timesteps)
}

/// Serial CFG with at least two compute threads: the negative and the positive half run as
/// two concurrent forwards, each on a pool of its own with half of the threads, instead of one
/// forward of the doubled batch split over all of them. Each half goes through the same math
/// as its rows of the doubled batch (only the blocking of the matrix products, hence their
/// rounding, may differ), and each keeps its own conditioning tensors, so that a model's
/// per-text caches stay valid across steps. On 2 cores this runs the PixArt loop in about 0.9 × the time of the
/// doubled batch (docs/performance.md): two single-threaded streams keep both cores busy
/// without a fork/join per op.
struct CfgStreams {
    threads: usize,
    /// The conditioning of the negative side, then the positive one.
    sides: [Conditioning; 2],
}

impl CfgStreams {
    /// None when there are fewer than 2 threads, or the forward is sequence parallel (its
    /// processor exchanges with peers once per forward, in order).
    fn new(guidance: &Guidance, ctx: &ForwardContext) -> Result<Option<Self>> {
        let threads = rayon::current_num_threads();
        if threads < 2 || !guidance.uses_cfg() || !ctx.is_serial() {
            return Ok(None);
        }
        Ok(Some(Self {
            threads,
            sides: [own_cfg_half(guidance, 0)?, own_cfg_half(guidance, 1)?],
        }))
    }

    /// The noise prediction of the doubled batch, (2B, ...): negative half, then positive.
    fn forward(
        &self,
        backbone: &dyn Backbone,
        model_input: &Tensor,
        timestep: &Tensor,
        ctx: &ForwardContext,
    ) -> Result<Tensor> {
        let (negative, positive) = in_two_streams(self.threads, |i| {
            let inputs = BackboneInputs {
                hidden_states: model_input,
                timestep,
                conditioning: &self.sides[i],
            };
            backbone.forward(&inputs, ctx)
        })?;
        Ok(Tensor::cat(&[negative, positive], 0)?)
    }
}

/// How classifier-free guidance shapes a rank's model batch.
pub(crate) struct CfgBatch<'a> {
    /// The cfg group when CFG runs in parallel (two ranks), else None.
    pub cfg_group: Option<&'a ProcessGroup>,
    /// Serial CFG: the latents go in twice (negative half, then positive).
    pub doubled: bool,
    /// The conditioning this rank's backbone sees.
    pub conditioning: Conditioning,
}

/// Serial CFG doubles the batch; CFG parallel runs one half on each of the two cfg ranks.
/// A cfg group of one rank means no CFG parallelism.
pub(crate) fn cfg_batch<'a>(
    guidance: &Guidance,
    cfg_group: Option<&'a ProcessGroup>,
) -> Result<CfgBatch<'a>> {
    let cfg_group = cfg_group.filter(|g| g.size() > 1);
    if let Some(group) = cfg_group {
        if group.size() != 2 || !guidance.uses_cfg() {
            return Err(Error::invalid(format!(
                "CFG parallel needs a request with classifier-free guidance and a cfg group of \
                 2 ranks; got {} ranks on {}",
                group.size(),
                group.name()
            )));
        }
    }
    let conditioning = match cfg_group {
        Some(group) => own_cfg_half(guidance, group.index())?,
        None => batched_conditioning(guidance)?,
    };
    Ok(CfgBatch {
        cfg_group,
        doubled: guidance.uses_cfg() && cfg_group.is_none(),
        conditioning,
    })
}

/// Negative then positive along the batch, as diffusers concatenates them.
fn batched_conditioning(guidance: &Guidance) -> Result<Conditioning> {
    match &guidance.negative {
        None => Ok(guidance.positive.clone()),
        Some(negative) => Conditioning::cat_batch(&[negative, &guidance.positive]),
    }
}

/// The conditioning of CFG-parallel member `index`: 0 the negative side, 1 the positive.
fn own_cfg_half(guidance: &Guidance, index: usize) -> Result<Conditioning> {
    let side = match (index, &guidance.negative) {
        (0, Some(negative)) => negative,
        (1, Some(_)) => &guidance.positive,
        _ => {
            return Err(Error::invalid(format!(
                "CFG parallel: rank index {index} in the cfg group has no text side"
            )))
        }
    };
    Ok(side.clone())
}

/// The backbone's prediction in the latents' dtype (f32): with `--dtype f16/bf16` the
/// transformer computes in that dtype and its output crosses back here, so that guidance, the
/// scheduler step and the latents between steps stay in f32 (diffusers' schedulers upcast the
/// sample to f32 for the step, too). A no-op when the dtypes already agree.
pub(crate) fn to_latents_dtype(prediction: &Tensor, latents: &Tensor) -> Result<Tensor> {
    Ok(prediction.to_dtype(latents.dtype())?)
}

/// uncond + scale·(cond − uncond) on the two halves of a CFG batch; identity without CFG.
pub fn apply_guidance(prediction: &Tensor, guidance: &Guidance, batch: usize) -> Result<Tensor> {
    if !guidance.uses_cfg() {
        return Ok(prediction.clone());
    }
    let uncond = prediction.narrow(0, 0, batch)?;
    let cond = prediction.narrow(0, batch, batch)?;
    Ok((&uncond + ((cond - &uncond)? * guidance.guidance_scale)?)?)
}

/// A model with learned sigma (PixArt, DiT) predicts (noise, variance) with out_channels =
/// 2·latent channels; the loop keeps the noise half, as diffusers' pipelines do.
pub(crate) fn drop_learned_sigma(prediction: &Tensor, latent_channels: usize) -> Result<Tensor> {
    if prediction.dim(1)? == 2 * latent_channels {
        Ok(prediction.narrow(1, 0, latent_channels)?)
    } else {
        Ok(prediction.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xfuser_schedulers::scheduling_ddim::DDIMScheduler;

    #[test]
    fn a_schedule_without_timesteps_is_refused() {
        let path = std::path::Path::new("scheduler_config.json");
        let mut scheduler = DDIMScheduler::from_config(&serde_json::json!({}), path).unwrap();
        let err = schedule(&scheduler).unwrap_err().to_string();
        assert!(err.contains("call set_timesteps"), "{err}");
        scheduler.set_timesteps(3).unwrap();
        assert_eq!(schedule(&scheduler).unwrap().len(), 3);
    }
}
