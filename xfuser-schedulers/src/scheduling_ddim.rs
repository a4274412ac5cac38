//! DDIM, the counterpart of diffusers' `DDIMScheduler` (`scheduling_ddim.py`); Song et al. 2020,
//! <https://arxiv.org/abs/2010.02502>.
//!
//! Supported: `eta` 0 (deterministic) and > 0 (set with [`DDIMScheduler::set_eta`]; diffusers
//! takes it as a `step` argument), `set_alpha_to_one`, `clip_sample` with
//! `clip_sample_range`, `timestep_spacing` linspace / leading / trailing with `steps_offset`,
//! `prediction_type` epsilon / sample / v_prediction, `rescale_betas_zero_snr`, the beta
//! schedules linear / scaled_linear / squaredcos_cap_v2 and `trained_betas`. Thresholding is
//! refused with [`Error::Unsupported`].

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use xfuser_core::random::Generator;
use xfuser_core::registry::SchedulerEntry;
use xfuser_core::scheduler::{Scheduler, SchedulerState};
use xfuser_core::{Error, Result};

use crate::scheduling_utils::{self as su, BetaConfig, BetaSchedule, Spacing};
use crate::StepWithNoise;

pub const CLASS_NAME: &str = "DDIMScheduler";

fn default_timestep_spacing() -> String {
    "leading".into()
}

/// `scheduler_config.json` of a `DDIMScheduler`, field for field.
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
    #[serde(default = "su::defaults::enabled")]
    pub clip_sample: bool,
    #[serde(default = "su::defaults::enabled")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
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
    pub rescale_betas_zero_snr: bool,
}

impl Default for Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    Sample,
    Velocity,
}

impl Prediction {
    pub(crate) const ALL: &'static [(&'static str, Prediction)] = &[
        ("epsilon", Prediction::Epsilon),
        ("sample", Prediction::Sample),
        ("v_prediction", Prediction::Velocity),
    ];
}

/// Timesteps as diffusers' DDIM and DDPM space them (integer-valued).
pub(crate) fn spaced_timesteps(
    spacing: Spacing,
    train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => {
            let mut t: Vec<f64> = su::numpy_linspace(0.0, train as f64 - 1.0, n)
                .into_iter()
                .map(su::np_round)
                .collect();
            t.reverse();
            t
        }
        Spacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        Spacing::Trailing => su::numpy_arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| su::np_round(t) - 1.0)
            .collect(),
    }
}

#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    config: Config,
    prediction: Prediction,
    spacing: Spacing,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    eta: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl DDIMScheduler {
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
            BetaSchedule::COMMON,
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
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            config,
            prediction,
            spacing,
            alphas_cumprod,
            final_alpha_cumprod,
            eta: 0.0,
            num_inference_steps: 0,
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

    /// The weight of the noise added at each step (diffusers' `step(eta=...)`, 0 by default):
    /// 0 is DDIM, 1 is DDPM-like.
    pub fn set_eta(&mut self, eta: f64) {
        // torch multiplies a float32 tensor by the Python float rounded to float32.
        self.eta = eta as f32;
    }

    pub fn eta(&self) -> f64 {
        self.eta as f64
    }
}

impl Scheduler for DDIMScheduler {
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
        self.num_inference_steps = num_inference_steps;
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

impl StepWithNoise for DDIMScheduler {
    fn step_needs_noise(&self, _state: &SchedulerState) -> bool {
        self.eta > 0.0
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
        let t = self.timesteps[index] as i64;
        // diffusers steps back by the leading spacing whatever the spacing of the schedule.
        let prev_t = t - (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());

        let out_dtype = model_output.dtype();
        let m = su::to_f32(model_output)?;
        let sample = su::to_f32(sample)?;
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => (su::div(&(&sample - su::mul(&m, sqrt_b)?)?, sqrt_a)?, m),
            Prediction::Sample => {
                let eps = su::div(&(&sample - su::mul(&m, sqrt_a)?)?, sqrt_b)?;
                (m, eps)
            }
            Prediction::Velocity => (
                (su::mul(&sample, sqrt_a)? - su::mul(&m, sqrt_b)?)?,
                (su::mul(&m, sqrt_a)? + su::mul(&sample, sqrt_b)?)?,
            ),
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let variance = ((1.0 - alpha_prev) / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = su::mul(&eps, (1.0 - alpha_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (su::mul(&x0, alpha_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let noise = su::to_f32(crate::require_noise(CLASS_NAME, index, noise)?)?;
            prev = (prev + su::mul(&noise, std_dev)?)?;
        }
        state.step_index += 1;
        Ok(prev.to_dtype(out_dtype)?)
    }
}

fn from_config(value: &serde_json::Value, file: &Path) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(DDIMScheduler::from_config(value, file)?))
}

xfuser_core::inventory::submit! {
    SchedulerEntry { class_name: CLASS_NAME, from_config }
}
