//! xfuser-schedulers: noise schedulers, one file per diffusers scheduler file, each
//! registering itself in the xfuser-core registry under its diffusers class name.
//!
//! | diffusers class                   | file                                   |
//! |-----------------------------------|----------------------------------------|
//! | `DPMSolverMultistepScheduler`     | `scheduling_dpmsolver_multistep.rs`    |
//! | `DDIMScheduler`                   | `scheduling_ddim.rs`                   |
//! | `DDPMScheduler`                   | `scheduling_ddpm.rs`                   |
//! | `EulerDiscreteScheduler`          | `scheduling_euler_discrete.rs`         |
//! | `FlowMatchEulerDiscreteScheduler` | `scheduling_flow_match_euler_discrete.rs` |
//!
//! Each reproduces diffusers 0.42.1 numerically: identical timesteps, float32 step arithmetic
//! in torch's order of operations. A scheduler holds no per-sample state: the step index and
//! the multistep history live in the caller's [`SchedulerState`], so each PipeFusion patch can
//! carry its own.

use candle_core::Tensor;
use xfuser_core::random::Generator;
use xfuser_core::scheduler::{Scheduler, SchedulerState};
use xfuser_core::{Error, Result};

pub mod scheduling_ddim;
pub mod scheduling_ddpm;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_euler_discrete;
pub mod scheduling_flow_match_euler_discrete;
pub(crate) mod scheduling_utils;

pub use scheduling_ddim::DDIMScheduler;
pub use scheduling_ddpm::DDPMScheduler;
pub use scheduling_dpmsolver_multistep::DPMSolverMultistepScheduler;
pub use scheduling_euler_discrete::EulerDiscreteScheduler;
pub use scheduling_flow_match_euler_discrete::FlowMatchEulerDiscreteScheduler;

/// The class names this crate registers.
pub const CLASS_NAMES: &[&str] = &[
    scheduling_ddim::CLASS_NAME,
    scheduling_ddpm::CLASS_NAME,
    scheduling_dpmsolver_multistep::CLASS_NAME,
    scheduling_euler_discrete::CLASS_NAME,
    scheduling_flow_match_euler_discrete::CLASS_NAME,
];

/// A scheduler whose step may add noise, with the noise passed in rather than drawn: what
/// [`Scheduler::step`] does after drawing it, and what the parity tests call with the noise
/// diffusers drew.
pub trait StepWithNoise: Scheduler {
    /// Whether step `state.step_index` adds noise (then `noise` must be given, shaped as the
    /// model output).
    fn step_needs_noise(&self, state: &SchedulerState) -> bool;

    fn step_with_noise(
        &self,
        state: &mut SchedulerState,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;
}

/// [`Scheduler::step`] for a [`StepWithNoise`] scheduler: draws the noise a stochastic step
/// needs from `generator` (as diffusers' `randn_tensor(model_output.shape, generator=...,
/// dtype=model_output.dtype)`), then steps.
pub(crate) fn step_drawing_noise<S: StepWithNoise + ?Sized>(
    scheduler: &S,
    state: &mut SchedulerState,
    model_output: &Tensor,
    sample: &Tensor,
    generator: Option<&mut Generator>,
) -> Result<Tensor> {
    if !scheduler.step_needs_noise(state) {
        return scheduler.step_with_noise(state, model_output, sample, None);
    }
    let generator = generator.ok_or_else(|| {
        Error::invalid(format!(
            "{}: step {} adds noise and needs a generator",
            scheduler.class_name(),
            state.step_index
        ))
    })?;
    let noise = generator
        .randn_tensor(model_output.dims(), model_output.device())?
        .to_dtype(model_output.dtype())?;
    scheduler.step_with_noise(state, model_output, sample, Some(&noise))
}

/// The noise a stochastic step was promised, as an error when missing.
pub(crate) fn require_noise<'a>(
    class: &str,
    index: usize,
    noise: Option<&'a Tensor>,
) -> Result<&'a Tensor> {
    noise.ok_or_else(|| {
        Error::invalid(format!(
            "{class}: step {index} adds noise and none was given"
        ))
    })
}
