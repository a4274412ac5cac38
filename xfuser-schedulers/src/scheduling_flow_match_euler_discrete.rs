//! Euler steps for flow matching (rectified flow), the counterpart of diffusers'
//! `FlowMatchEulerDiscreteScheduler` (`scheduling_flow_match_euler_discrete.py`), as used by
//! SD3 and Flux: `x_{t+1} = x_t + (sigma_{t+1} - sigma_t) · v`.
//!
//! Supported: `shift`, `use_dynamic_shifting` with `time_shift_type` exponential / linear (the
//! `mu` diffusers takes in `set_timesteps` is given by [`FlowMatchEulerDiscreteScheduler::set_mu`]),
//! `shift_terminal`, `use_karras_sigmas`, `use_exponential_sigmas`, `invert_sigmas` and
//! `stochastic_sampling`. Beta sigmas need scipy's beta quantile and are refused with
//! [`Error::Unsupported`]; per-token timesteps are not offered.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use xfuser_core::random::Generator;
use xfuser_core::registry::SchedulerEntry;
use xfuser_core::scheduler::{Scheduler, SchedulerState, TimestepOptions};
use xfuser_core::{Error, Result};

use crate::scheduling_utils as su;
use crate::StepWithNoise;

pub const CLASS_NAME: &str = "FlowMatchEulerDiscreteScheduler";

fn default_base_shift() -> Option<f64> {
    Some(0.5)
}
fn default_max_shift() -> Option<f64> {
    Some(1.15)
}
fn default_base_image_seq_len() -> usize {
    256
}
fn default_max_image_seq_len() -> usize {
    4096
}
fn default_time_shift_type() -> String {
    "exponential".into()
}

/// `scheduler_config.json` of a `FlowMatchEulerDiscreteScheduler`, field for field.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "su::defaults::num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "su::defaults::one")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "default_base_shift")]
    pub base_shift: Option<f64>,
    #[serde(default = "default_max_shift")]
    pub max_shift: Option<f64>,
    #[serde(default = "default_base_image_seq_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "default_max_image_seq_len")]
    pub max_image_seq_len: usize,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default = "default_time_shift_type")]
    pub time_shift_type: String,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

impl Default for Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: Config,
    exponential_time_shift: bool,
    /// The ends of the training schedule (float32 values), which set_timesteps spaces between.
    sigma_min: f64,
    sigma_max: f64,
    mu: Option<f64>,
    /// Per timestep, plus the final sigma.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
}

impl FlowMatchEulerDiscreteScheduler {
    pub fn new(config: Config, file: &Path) -> Result<Self> {
        let exponential_time_shift = su::choose(
            file,
            "time_shift_type",
            &config.time_shift_type,
            &[("exponential", true), ("linear", false)],
        )?;
        let ramps = [
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        ];
        if ramps.iter().filter(|&&b| b).count() > 1 {
            return Err(su::invalid_value(
                file,
                "use_karras_sigmas",
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be set"
                    .into(),
            ));
        }
        if config.use_beta_sigmas {
            return Err(su::unimplemented_option(
                file,
                "use_beta_sigmas",
                "`true` is not implemented (needs scipy's beta quantile)",
            ));
        }
        let n = config.num_train_timesteps;
        if n == 0 {
            return Err(su::invalid_value(
                file,
                "num_train_timesteps",
                "must be > 0".into(),
            ));
        }
        // Training sigmas t / N for t = N..1 in float32, shifted unless the shift is dynamic.
        let (shift, shift_m1) = (config.shift as f32, (config.shift - 1.0) as f32);
        let train: Vec<f32> = su::numpy_linspace(1.0, n as f64, n)
            .into_iter()
            .rev()
            .map(|t| {
                let s = t as f32 / n as f32;
                if config.use_dynamic_shifting {
                    s
                } else {
                    shift * s / (1.0 + shift_m1 * s)
                }
            })
            .collect();
        let sigma_max = train[0] as f64;
        let sigma_min = train[n - 1] as f64;
        let mut sigmas = train;
        sigmas.push(0.0);
        Ok(Self {
            config,
            exponential_time_shift,
            sigma_min,
            sigma_max,
            mu: None,
            sigmas,
            timesteps: Vec::new(),
        })
    }

    pub fn from_config(value: &serde_json::Value, file: &Path) -> Result<Self> {
        Self::new(su::parse_config(value, file)?, file)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Per timestep, plus the final sigma (float32).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The `mu` of dynamic shifting (diffusers' `set_timesteps(mu=...)`), used by the next
    /// [`Scheduler::set_timesteps`]; required when `use_dynamic_shifting` is set.
    pub fn set_mu(&mut self, mu: f64) {
        self.mu = Some(mu);
    }

    /// `set_mu` then `set_timesteps`.
    pub fn set_timesteps_with_mu(&mut self, num_inference_steps: usize, mu: f64) -> Result<()> {
        self.set_mu(mu);
        self.set_timesteps(num_inference_steps)
    }

    fn time_shift(&self, mu: f64, t: f64) -> f64 {
        // diffusers' time_shift(mu, sigma=1.0, t); the power 1.0 is exact.
        if self.exponential_time_shift {
            mu.exp() / (mu.exp() + (1.0 / t - 1.0))
        } else {
            mu / (mu + (1.0 / t - 1.0))
        }
    }

    /// `time_shift` on a float32 sigma as numpy computes it on a float32 array (a Python
    /// float operand is rounded to float32, every operation in float32).
    fn time_shift_f32(&self, mu: f64, t: f32) -> f32 {
        let m = if self.exponential_time_shift {
            mu.exp() as f32
        } else {
            mu as f32
        };
        m / (m + (1.0 / t - 1.0))
    }

    /// The shifted, stretched sigmas of `n` steps: from the default linear schedule (in
    /// float64, as numpy's linspace), or from custom sigmas (cast to float32 first, the shifts
    /// then in float32, as diffusers computes on that array).
    fn shifted_sigmas(&self, n: usize, custom: Option<&[f64]>) -> Result<Vec<f64>> {
        let mu = if self.config.use_dynamic_shifting {
            Some(self.mu.ok_or_else(|| {
                Error::invalid(format!(
                    "{CLASS_NAME}: use_dynamic_shifting needs mu: call set_mu (or set_timesteps_with_mu)"
                ))
            })?)
        } else {
            None
        };
        let terminal = self.config.shift_terminal.filter(|&t| t != 0.0);
        if let Some(custom) = custom {
            let mut sigmas: Vec<f32> = custom.iter().map(|&s| s as f32).collect();
            match mu {
                Some(mu) => sigmas
                    .iter_mut()
                    .for_each(|s| *s = self.time_shift_f32(mu, *s)),
                None => {
                    let (shift, shift_m1) =
                        (self.config.shift as f32, (self.config.shift - 1.0) as f32);
                    sigmas
                        .iter_mut()
                        .for_each(|s| *s = shift * *s / (1.0 + shift_m1 * *s));
                }
            }
            if let Some(terminal) = terminal {
                let scale = (1.0 - sigmas[n - 1]) / (1.0 - terminal) as f32;
                sigmas
                    .iter_mut()
                    .for_each(|s| *s = 1.0 - (1.0 - *s) / scale);
            }
            return Ok(sigmas.into_iter().map(f64::from).collect());
        }
        let train = self.config.num_train_timesteps as f64;
        let mut sigmas: Vec<f64> =
            su::numpy_linspace(self.sigma_max * train, self.sigma_min * train, n)
                .into_iter()
                .map(|t| t / train)
                .collect();
        match mu {
            Some(mu) => {
                sigmas = sigmas.into_iter().map(|s| self.time_shift(mu, s)).collect();
            }
            None => {
                let shift = self.config.shift;
                sigmas = sigmas
                    .into_iter()
                    .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
                    .collect();
            }
        }
        if let Some(terminal) = terminal {
            let scale = (1.0 - sigmas[n - 1]) / (1.0 - terminal);
            sigmas = sigmas
                .into_iter()
                .map(|s| 1.0 - (1.0 - s) / scale)
                .collect();
        }
        Ok(sigmas)
    }

    /// diffusers' `set_timesteps(n, sigmas=custom)`.
    fn schedule(&mut self, num_inference_steps: usize, custom: Option<&[f64]>) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(Error::invalid(format!(
                "{CLASS_NAME}: num_inference_steps must be > 0"
            )));
        }
        let n = num_inference_steps;
        let mut sigmas = self.shifted_sigmas(n, custom)?;
        if self.config.use_karras_sigmas {
            sigmas = su::karras_sigmas(sigmas[n - 1], sigmas[0], n);
        } else if self.config.use_exponential_sigmas {
            sigmas = su::exponential_sigmas(sigmas[n - 1], sigmas[0], n);
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        let train32 = self.config.num_train_timesteps as f32;
        if self.config.invert_sigmas {
            sigmas.iter_mut().for_each(|s| *s = 1.0 - *s);
        }
        self.timesteps = sigmas.iter().map(|&s| (s * train32) as f64).collect();
        sigmas.push(if self.config.invert_sigmas { 1.0 } else { 0.0 });
        self.sigmas = sigmas;
        Ok(())
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn set_timesteps_with(
        &mut self,
        num_inference_steps: usize,
        options: &TimestepOptions,
    ) -> Result<()> {
        if let Some(mu) = options.mu {
            self.set_mu(mu);
        }
        match &options.sigmas {
            None => self.set_timesteps(num_inference_steps),
            Some(custom) => {
                if custom.len() != num_inference_steps {
                    return Err(Error::invalid(format!(
                        "{CLASS_NAME}: {} custom sigmas for {num_inference_steps} steps",
                        custom.len()
                    )));
                }
                self.schedule(num_inference_steps, Some(custom))
            }
        }
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.schedule(num_inference_steps, None)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(
        &self,
        state: &mut SchedulerState,
        model_output: &Tensor,
        sample: &Tensor,
        generator: Option<&mut Generator>,
    ) -> Result<Tensor> {
        if !self.config.stochastic_sampling {
            return self.step_with_noise(state, model_output, sample, None);
        }
        // diffusers draws float32 noise shaped as the (float32) sample, not the model output.
        let generator = generator.ok_or_else(|| {
            Error::invalid(format!(
                "{CLASS_NAME}: stochastic_sampling step {} needs a generator",
                state.step_index
            ))
        })?;
        let noise = generator.randn_tensor(sample.dims(), sample.device())?;
        self.step_with_noise(state, model_output, sample, Some(&noise))
    }
}

impl StepWithNoise for FlowMatchEulerDiscreteScheduler {
    fn step_needs_noise(&self, _state: &SchedulerState) -> bool {
        self.config.stochastic_sampling
    }

    fn step_with_noise(
        &self,
        state: &mut SchedulerState,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let index = state.step_index;
        su::check_step(CLASS_NAME, index, self.timesteps.len())?;
        let (sigma, next) = (self.sigmas[index], self.sigmas[index + 1]);
        let out_dtype = model_output.dtype();
        let m = su::to_f32(model_output)?;
        let sample = su::to_f32(sample)?;
        let prev = if self.config.stochastic_sampling {
            let noise = su::to_f32(crate::require_noise(CLASS_NAME, index, noise)?)?;
            let x0 = (&sample - su::mul(&m, sigma)?)?;
            (su::mul(&x0, 1.0 - next)? + su::mul(&noise, next)?)?
        } else {
            (&sample + su::mul(&m, next - sigma)?)?
        };
        state.step_index += 1;
        Ok(prev.to_dtype(out_dtype)?)
    }
}

fn from_config(value: &serde_json::Value, file: &Path) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(FlowMatchEulerDiscreteScheduler::from_config(
        value, file,
    )?))
}

xfuser_core::inventory::submit! {
    SchedulerEntry { class_name: CLASS_NAME, from_config }
}
