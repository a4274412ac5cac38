//! Euler (Karras et al. 2022, algorithm 2 without churn), the counterpart of diffusers'
//! `EulerDiscreteScheduler` (`scheduling_euler_discrete.py`), <https://arxiv.org/abs/2206.00364>.
//!
//! The sample lives at noise level sigma (it is `x / alpha`): [`Scheduler::init_noise_sigma`] is
//! the largest sigma and [`Scheduler::scale_model_input`] divides by `sqrt(sigma² + 1)`.
//!
//! Supported: `timestep_spacing` linspace / leading / trailing with `steps_offset`,
//! `interpolation_type` linear / log_linear, `use_karras_sigmas` and `use_exponential_sigmas`
//! (with `sigma_min` / `sigma_max`), `final_sigmas_type` zero / sigma_min, `prediction_type`
//! epsilon / v_prediction / sample, `timestep_type` discrete / continuous,
//! `rescale_betas_zero_snr`, the beta schedules linear / scaled_linear / squaredcos_cap_v2 and
//! `trained_betas`. Beta sigmas need scipy's beta quantile and are refused with
//! [`Error::Unsupported`]; `step`'s churn arguments keep diffusers' defaults (no churn).

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use xfuser_core::random::Generator;
use xfuser_core::registry::SchedulerEntry;
use xfuser_core::scheduler::{Scheduler, SchedulerState};
use xfuser_core::{Error, Result};

use crate::scheduling_utils::{self as su, BetaConfig, BetaSchedule, Spacing};
use crate::StepWithNoise;

pub const CLASS_NAME: &str = "EulerDiscreteScheduler";

fn default_interpolation_type() -> String {
    "linear".into()
}
fn default_timestep_spacing() -> String {
    "linspace".into()
}
fn default_timestep_type() -> String {
    "discrete".into()
}
fn default_final_sigmas_type() -> String {
    "zero".into()
}

/// `scheduler_config.json` of an `EulerDiscreteScheduler`, field for field.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "su::defaults::num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "su::defaults::beta_start")]
    pub beta_start: f64,
    #[serde(default = "su::defaults::beta_end")]
    pub beta_end: f64,
    #[serde(default = "su::defaults::beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "su::defaults::prediction_type")]
    pub prediction_type: String,
    #[serde(default = "default_interpolation_type")]
    pub interpolation_type: String,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    #[serde(default)]
    pub sigma_min: Option<f64>,
    #[serde(default)]
    pub sigma_max: Option<f64>,
    #[serde(default = "default_timestep_spacing")]
    pub timestep_spacing: String,
    #[serde(default = "default_timestep_type")]
    pub timestep_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default = "default_final_sigmas_type")]
    pub final_sigmas_type: String,
}

impl Default for Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    Sample,
    Velocity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ramp {
    None,
    Karras,
    Exponential,
}

#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: Config,
    prediction: Prediction,
    spacing: Spacing,
    log_linear: bool,
    ramp: Ramp,
    continuous_timesteps: bool,
    final_sigma_min: bool,
    alphas_cumprod: Vec<f32>,
    /// Per timestep, plus the final sigma.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
}

impl EulerDiscreteScheduler {
    pub fn new(config: Config, file: &Path) -> Result<Self> {
        let prediction = su::choose(
            file,
            "prediction_type",
            &config.prediction_type,
            &[
                ("epsilon", Prediction::Epsilon),
                ("sample", Prediction::Sample),
                ("original_sample", Prediction::Sample),
                ("v_prediction", Prediction::Velocity),
            ],
        )?;
        let spacing = su::choose(
            file,
            "timestep_spacing",
            &config.timestep_spacing,
            Spacing::ALL,
        )?;
        let log_linear = su::choose(
            file,
            "interpolation_type",
            &config.interpolation_type,
            &[("linear", false), ("log_linear", true)],
        )?;
        let continuous = su::choose(
            file,
            "timestep_type",
            &config.timestep_type,
            &[("discrete", false), ("continuous", true)],
        )?;
        let final_sigma_min = su::choose(
            file,
            "final_sigmas_type",
            &config.final_sigmas_type,
            &[("zero", false), ("sigma_min", true)],
        )?;
        let karras = config.use_karras_sigmas.unwrap_or(false);
        let exponential = config.use_exponential_sigmas.unwrap_or(false);
        let beta = config.use_beta_sigmas.unwrap_or(false);
        if [karras, exponential, beta].iter().filter(|&&b| b).count() > 1 {
            return Err(su::invalid_value(
                file,
                "use_karras_sigmas",
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be set"
                    .into(),
            ));
        }
        if beta {
            return Err(su::unimplemented_option(
                file,
                "use_beta_sigmas",
                "`true` is not implemented (needs scipy's beta quantile)",
            ));
        }
        let ramp = match (karras, exponential) {
            (true, _) => Ramp::Karras,
            (_, true) => Ramp::Exponential,
            _ => Ramp::None,
        };
        let schedule = su::choose(
            file,
            "beta_schedule",
            &config.beta_schedule,
            BetaSchedule::COMMON,
        )?;
        let mut alphas_cumprod = su::alphas_cumprod(&su::betas(&BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        }));
        if alphas_cumprod.len() != config.num_train_timesteps || alphas_cumprod.is_empty() {
            return Err(su::invalid_value(
                file,
                "trained_betas",
                format!(
                    "has {} values, num_train_timesteps is {}",
                    alphas_cumprod.len(),
                    config.num_train_timesteps
                ),
            ));
        }
        if config.rescale_betas_zero_snr {
            *alphas_cumprod.last_mut().expect("non-empty") = 2f32.powi(-24);
        }
        // Before set_timesteps: every training sigma, noisiest first, then 0.
        let mut sigmas = su::sigmas_from_alphas_cumprod(&alphas_cumprod);
        sigmas.reverse();
        sigmas.push(0.0);
        Ok(Self {
            continuous_timesteps: continuous && prediction == Prediction::Velocity,
            config,
            prediction,
            spacing,
            log_linear,
            ramp,
            final_sigma_min,
            alphas_cumprod,
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

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// Per timestep, plus the final sigma (float32).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The spaced timesteps, float32 as diffusers keeps them.
    fn spaced_timesteps(&self, n: usize) -> Vec<f32> {
        let train = self.config.num_train_timesteps;
        match self.spacing {
            Spacing::Linspace => su::numpy_linspace(0.0, train as f64 - 1.0, n)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            Spacing::Leading => {
                let ratio = train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f32 + self.config.steps_offset as f32)
                    .collect()
            }
            Spacing::Trailing => su::numpy_arange(train as f64, 0.0, -(train as f64 / n as f64))
                .into_iter()
                .map(|t| su::np_round(t) as f32 - 1.0)
                .collect(),
        }
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(Error::invalid(format!(
                "{CLASS_NAME}: num_inference_steps must be > 0"
            )));
        }
        let n = num_inference_steps;
        let table = su::sigmas_from_alphas_cumprod(&self.alphas_cumprod);
        let log_table: Vec<f32> = table.iter().map(|s| s.ln()).collect();
        let mut timesteps: Vec<f64> = self
            .spaced_timesteps(n)
            .into_iter()
            .map(f64::from)
            .collect();
        let mut sigmas: Vec<f64> = if self.log_linear {
            let last = *log_table.last().expect("non-empty");
            su::torch_linspace_f32(last as f64, log_table[0] as f64, n + 1)
                .into_iter()
                .map(|l| l.exp() as f64)
                .collect()
        } else {
            timesteps
                .iter()
                .map(|&t| su::interp_unit_grid(t, &table))
                .collect()
        };
        if self.ramp != Ramp::None {
            let sigma_min = self
                .config
                .sigma_min
                .unwrap_or(*sigmas.last().expect("n > 0"));
            let sigma_max = self.config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = match self.ramp {
                Ramp::Karras => su::karras_sigmas(sigma_min, sigma_max, n),
                _ => su::exponential_sigmas(sigma_min, sigma_max, n),
            };
            timesteps = sigmas
                .iter()
                .map(|&s| su::sigma_to_t(s, &log_table))
                .collect();
        }
        sigmas.push(if self.final_sigma_min {
            su::sigma_of(self.alphas_cumprod[0]) as f64
        } else {
            0.0
        });
        self.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        self.timesteps = if self.continuous_timesteps {
            let k = self.sigmas.len() - 1;
            self.sigmas[..k]
                .iter()
                .map(|s| (0.25 * s.ln()) as f64)
                .collect()
        } else {
            timesteps.into_iter().map(|t| t as f32 as f64).collect()
        };
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self
            .sigmas
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        match self.spacing {
            Spacing::Linspace | Spacing::Trailing => max as f64,
            Spacing::Leading => (max * max + 1.0).sqrt() as f64,
        }
    }

    fn scale_model_input(&self, state: &SchedulerState, sample: &Tensor) -> Result<Tensor> {
        su::check_step(CLASS_NAME, state.step_index, self.timesteps.len())?;
        let sigma = self.sigmas[state.step_index];
        su::div(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &self,
        state: &mut SchedulerState,
        model_output: &Tensor,
        sample: &Tensor,
        generator: Option<&mut Generator>,
    ) -> Result<Tensor> {
        let _ = generator;
        self.step_with_noise(state, model_output, sample, None)
    }
}

impl StepWithNoise for EulerDiscreteScheduler {
    fn step_needs_noise(&self, _state: &SchedulerState) -> bool {
        false
    }

    fn step_with_noise(
        &self,
        state: &mut SchedulerState,
        model_output: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let _ = noise;
        let index = state.step_index;
        su::check_step(CLASS_NAME, index, self.timesteps.len())?;
        // Without churn (diffusers' default s_churn = 0) sigma_hat is sigma.
        let sigma = self.sigmas[index];
        let out_dtype = model_output.dtype();
        let m = su::to_f32(model_output)?;
        let sample = su::to_f32(sample)?;
        let x0 = match self.prediction {
            Prediction::Sample => m,
            Prediction::Epsilon => (&sample - su::mul(&m, sigma)?)?,
            Prediction::Velocity => {
                let s2 = sigma * sigma + 1.0;
                (su::mul(&m, -sigma / s2.sqrt())? + su::div(&sample, s2)?)?
            }
        };
        let derivative = su::div(&(&sample - x0)?, sigma)?;
        let dt = self.sigmas[index + 1] - sigma;
        let prev = (&sample + su::mul(&derivative, dt)?)?;
        state.step_index += 1;
        Ok(prev.to_dtype(out_dtype)?)
    }
}

fn from_config(value: &serde_json::Value, file: &Path) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(EulerDiscreteScheduler::from_config(value, file)?))
}

xfuser_core::inventory::submit! {
    SchedulerEntry { class_name: CLASS_NAME, from_config }
}
