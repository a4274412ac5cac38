//! DDPM, the counterpart of diffusers' `DDPMScheduler` (`scheduling_ddpm.py`); Ho et al. 2020,
//! <https://arxiv.org/abs/2006.11239>, sampled on a respaced schedule of `num_inference_steps`.
//!
//! Supported: `variance_type` fixed_small / fixed_small_log / fixed_large, `clip_sample` with
//! `clip_sample_range`, `timestep_spacing` linspace / leading / trailing with `steps_offset`,
//! `prediction_type` epsilon / sample / v_prediction, `rescale_betas_zero_snr`, the beta
//! schedules linear / scaled_linear / squaredcos_cap_v2 / sigmoid / laplace and
//! `trained_betas`. The learned variances, fixed_large_log (whose square root diffusers takes
//! of a logarithm) and thresholding are refused with [`Error::Unsupported`].

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use xfuser_core::random::Generator;
use xfuser_core::registry::SchedulerEntry;
use xfuser_core::scheduler::{Scheduler, SchedulerState};
use xfuser_core::{Error, Result};

use crate::scheduling_ddim::{spaced_timesteps, Prediction};
use crate::scheduling_utils::{self as su, BetaConfig, BetaSchedule, Spacing};
use crate::StepWithNoise;

pub const CLASS_NAME: &str = "DDPMScheduler";

fn default_variance_type() -> String {
    "fixed_small".into()
}
fn default_timestep_spacing() -> String {
    "leading".into()
}

/// `scheduler_config.json` of a `DDPMScheduler`, field for field.
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
    #[serde(default = "default_variance_type")]
    pub variance_type: String,
    #[serde(default = "su::defaults::enabled")]
    pub clip_sample: bool,
    #[serde(default = "su::defaults::prediction_type")]
    pub prediction_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "su::defaults::dynamic_thresholding_ratio")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(default = "su::defaults::one")]
    pub clip_sample_range: f64,
    #[serde(default = "su::defaults::one")]
    pub sample_max_value: f64,
    #[serde(default = "default_timestep_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl Default for Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    Small,
    SmallLog,
    Large,
}

#[derive(Debug, Clone)]
pub struct DDPMScheduler {
    config: Config,
    prediction: Prediction,
    spacing: Spacing,
    variance: Variance,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
}

impl DDPMScheduler {
    pub fn new(config: Config, file: &Path) -> Result<Self> {
        let prediction = su::choose(
            file,
            "prediction_type",
            &config.prediction_type,
            Prediction::ALL,
        )?;
        let spacing = su::choose(
            file,
            "timestep_spacing",
            &config.timestep_spacing,
            Spacing::ALL,
        )?;
        let variance = match config.variance_type.as_str() {
            "fixed_small" => Variance::Small,
            "fixed_small_log" => Variance::SmallLog,
            "fixed_large" => Variance::Large,
            "fixed_large_log" | "learned" | "learned_range" => {
                return Err(su::unimplemented_option(
                    file,
                    "variance_type",
                    &format!("`{}` is not implemented", config.variance_type),
                ))
            }
            other => {
                return Err(su::unsupported_value(
                    file,
                    "variance_type",
                    other,
                    &["fixed_small", "fixed_small_log", "fixed_large"],
                ))
            }
        };
        if config.thresholding {
            return Err(su::unimplemented_option(
                file,
                "thresholding",
                "`true` is not implemented",
            ));
        }
        let schedule = su::choose(
            file,
            "beta_schedule",
            &config.beta_schedule,
            BetaSchedule::DDPM,
        )?;
        let alphas_cumprod = su::alphas_cumprod(&su::betas(&BetaConfig {
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
        Ok(Self {
            config,
            prediction,
            spacing,
            variance,
            alphas_cumprod,
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

    /// (alpha_prod_t, alpha_prod_t_prev) of step `index`; the step after the last lands on 1.
    fn alphas(&self, index: usize) -> (f32, f32) {
        let t = self.timesteps[index] as usize;
        let prev = match self.timesteps.get(index + 1) {
            Some(&p) if p >= 0.0 => self.alphas_cumprod[p as usize],
            _ => 1.0,
        };
        (self.alphas_cumprod[t], prev)
    }
}

impl Scheduler for DDPMScheduler {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let train = self.config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > train {
            return Err(Error::invalid(format!(
                "{CLASS_NAME}: num_inference_steps {num_inference_steps} must be in 1..={train}"
            )));
        }
        self.timesteps = spaced_timesteps(
            self.spacing,
            train,
            num_inference_steps,
            self.config.steps_offset,
        );
        Ok(())
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
        crate::step_drawing_noise(self, state, model_output, sample, generator)
    }
}

impl StepWithNoise for DDPMScheduler {
    fn step_needs_noise(&self, state: &SchedulerState) -> bool {
        self.timesteps
            .get(state.step_index)
            .is_some_and(|&t| t > 0.0)
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
        let needs_noise = self.step_needs_noise(state);
        let (alpha_t, alpha_prev) = self.alphas(index);
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let out_dtype = model_output.dtype();
        let m = su::to_f32(model_output)?;
        let sample = su::to_f32(sample)?;
        let x0 = match self.prediction {
            Prediction::Epsilon => {
                su::div(&(&sample - su::mul(&m, beta_t.sqrt())?)?, alpha_t.sqrt())?
            }
            Prediction::Sample => m,
            Prediction::Velocity => {
                (su::mul(&sample, alpha_t.sqrt())? - su::mul(&m, beta_t.sqrt())?)?
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let x0_coeff = (alpha_prev.sqrt() * current_beta) / beta_t;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev = (su::mul(&x0, x0_coeff)? + su::mul(&sample, sample_coeff)?)?;
        if needs_noise {
            let noise = su::to_f32(crate::require_noise(CLASS_NAME, index, noise)?)?;
            let small = ((1.0 - alpha_prev) / (1.0 - alpha_t) * current_beta).max(1e-20);
            let std = match self.variance {
                Variance::Small => small.sqrt(),
                Variance::SmallLog => (0.5 * small.ln()).exp(),
                Variance::Large => current_beta.sqrt(),
            };
            prev = (prev + su::mul(&noise, std)?)?;
        }
        state.step_index += 1;
        Ok(prev.to_dtype(out_dtype)?)
    }
}

fn from_config(value: &serde_json::Value, file: &Path) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(DDPMScheduler::from_config(value, file)?))
}

xfuser_core::inventory::submit! {
    SchedulerEntry { class_name: CLASS_NAME, from_config }
}
