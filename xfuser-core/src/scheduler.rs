//! The scheduler interface. A scheduler's configuration and timestep schedule are immutable
//! during a run; everything a step changes lives in a [`SchedulerState`] owned by the caller.
//! That split is what lets PipeFusion step each latent patch with its own multistep history.

use candle_core::Tensor;

use crate::random::Generator;
use crate::{Error, Result};

/// What a pipeline passes to `set_timesteps` besides the step count (diffusers' keyword
/// arguments of `scheduler.set_timesteps`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimestepOptions {
    /// The shift of a dynamically shifted schedule (Flux: from the image's token count).
    pub mu: Option<f64>,
    /// Custom sigmas, one per step (diffusers' `sigmas=`; FluxPipeline passes
    /// `linspace(1, 1 / n, n)`). Only flow-matching schedules take them.
    pub sigmas: Option<Vec<f64>>,
}

/// What a scheduler remembers between steps of one sample (or of one patch of it).
#[derive(Debug, Clone, Default)]
pub struct SchedulerState {
    /// Index into [`Scheduler::timesteps`] of the step to take next.
    pub step_index: usize,
    /// The converted model outputs of previous steps, oldest first (multistep solvers only).
    pub model_outputs: Vec<Tensor>,
    /// How many lower-order warm-up steps a multistep solver has taken.
    pub lower_order_nums: usize,
}

pub trait Scheduler: Send + Sync {
    /// The diffusers class name, e.g. `DPMSolverMultistepScheduler`.
    fn class_name(&self) -> &'static str;

    /// Computes the schedule for `num_inference_steps`, as diffusers' `set_timesteps`.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// `set_timesteps` with the pipeline's extra inputs. A scheduler that takes none of them
    /// refuses any that is given rather than ignore it.
    fn set_timesteps_with(
        &mut self,
        num_inference_steps: usize,
        options: &TimestepOptions,
    ) -> Result<()> {
        if let Some(mu) = options.mu {
            return Err(Error::invalid(format!(
                "{} takes no `mu` (given {mu}): only dynamically shifted schedules do",
                self.class_name()
            )));
        }
        if options.sigmas.is_some() {
            return Err(Error::invalid(format!(
                "{} takes no custom `sigmas`: only flow-matching schedules do",
                self.class_name()
            )));
        }
        self.set_timesteps(num_inference_steps)
    }

    /// The schedule's timesteps, as diffusers' `scheduler.timesteps` (integer-valued for the
    /// discrete schedulers, stored as f64 so flow-matching timesteps fit too).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation the initial noise is scaled by.
    fn init_noise_sigma(&self) -> f64;

    /// A fresh state for a new sample, positioned at the first step.
    fn new_state(&self) -> SchedulerState {
        SchedulerState::default()
    }

    /// Scales the denoising model's input at step `state.step_index` (identity for most).
    fn scale_model_input(&self, state: &SchedulerState, sample: &Tensor) -> Result<Tensor> {
        let _ = state;
        Ok(sample.clone())
    }

    /// Takes step `state.step_index`: from `sample` and the model's output to the previous
    /// (less noisy) sample, then advances `state`. `generator` supplies noise for stochastic
    /// steps (DDPM, DDIM with eta > 0); a stochastic step without one is an error.
    fn step(
        &self,
        state: &mut SchedulerState,
        model_output: &Tensor,
        sample: &Tensor,
        generator: Option<&mut Generator>,
    ) -> Result<Tensor>;
}
