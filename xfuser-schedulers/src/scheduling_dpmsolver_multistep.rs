//! DPM-Solver and DPM-Solver++ multistep, the counterpart of diffusers'
//! `DPMSolverMultistepScheduler` (`scheduling_dpmsolver_multistep.py`); Lu et al. 2022,
//! <https://arxiv.org/abs/2206.00927> and <https://arxiv.org/abs/2211.01095>.
//!
//! Supported: `algorithm_type` dpmsolver++ / dpmsolver, `solver_order` 1–3, `solver_type`
//! midpoint / heun, `lower_order_final`, `euler_at_final`, `timestep_spacing` linspace /
//! leading / trailing with `steps_offset`, `lambda_min_clipped`, `use_karras_sigmas`,
//! `prediction_type` epsilon / v_prediction / sample, `final_sigmas_type` zero / sigma_min,
//! `rescale_betas_zero_snr`, the beta schedules linear / scaled_linear / squaredcos_cap_v2 and
//! `trained_betas`. The SDE variants, thresholding and the exponential / beta / lu / flow sigma
//! ramps are refused with [`Error::Unsupported`].
//!
//! The multistep history lives in the caller's [`SchedulerState`]: `model_outputs` holds the
//! converted outputs of the last `solver_order` steps, `lower_order_nums` the warm-up count.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use xfuser_core::random::Generator;
use xfuser_core::registry::SchedulerEntry;
use xfuser_core::scheduler::{Scheduler, SchedulerState};
use xfuser_core::{Error, Result};

use crate::scheduling_utils::{self as su, BetaConfig, BetaSchedule, Spacing};

pub const CLASS_NAME: &str = "DPMSolverMultistepScheduler";

fn default_solver_order() -> usize {
    2
}
fn default_algorithm_type() -> String {
    "dpmsolver++".into()
}
fn default_solver_type() -> String {
    "midpoint".into()
}
fn default_final_sigmas_type() -> String {
    "zero".into()
}
fn default_lambda_min_clipped() -> f64 {
    f64::NEG_INFINITY
}
fn default_timestep_spacing() -> String {
    "linspace".into()
}
fn default_time_shift_type() -> String {
    "exponential".into()
}

/// `scheduler_config.json` of a `DPMSolverMultistepScheduler`, field for field.
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
    #[serde(default = "default_solver_order")]
    pub solver_order: usize,
    #[serde(default = "su::defaults::prediction_type")]
    pub prediction_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "su::defaults::dynamic_thresholding_ratio")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(default = "su::defaults::one")]
    pub sample_max_value: f64,
    #[serde(default = "default_algorithm_type")]
    pub algorithm_type: String,
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    #[serde(default = "su::defaults::enabled")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub euler_at_final: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub use_lu_lambdas: bool,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default = "su::defaults::one")]
    pub flow_shift: f64,
    #[serde(default = "default_final_sigmas_type")]
    pub final_sigmas_type: String,
    #[serde(
        default = "default_lambda_min_clipped",
        deserialize_with = "xfuser_core::config::f64_or_non_finite"
    )]
    pub lambda_min_clipped: f64,
    #[serde(default)]
    pub variance_type: Option<String>,
    #[serde(default = "default_timestep_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "default_time_shift_type")]
    pub time_shift_type: String,
}

impl Default for Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    DpmSolverPP,
    DpmSolver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    Sample,
    Velocity,
    Flow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// The schedule-independent tables and the validated options.
#[derive(Debug, Clone)]
pub struct DPMSolverMultistepScheduler {
    config: Config,
    algorithm: Algorithm,
    solver_type: SolverType,
    prediction: Prediction,
    spacing: Spacing,
    final_sigmas: FinalSigmas,
    learned_variance: bool,
    alphas_cumprod: Vec<f32>,
    /// `sigmas[i]` is the noise level of timestep `timesteps[i]`, plus the final one.
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
}

impl DPMSolverMultistepScheduler {
    /// Builds the scheduler from its parsed config; `file` names the config in errors.
    pub fn new(config: Config, file: &Path) -> Result<Self> {
        let algorithm = match config.algorithm_type.as_str() {
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPP,
            "dpmsolver" => Algorithm::DpmSolver,
            "sde-dpmsolver++" | "sde-dpmsolver" => {
                return Err(su::unimplemented_option(
                    file,
                    "algorithm_type",
                    &format!(
                        "`{}` (stochastic DPM-Solver) is not implemented",
                        config.algorithm_type
                    ),
                ))
            }
            other => {
                return Err(su::unsupported_value(
                    file,
                    "algorithm_type",
                    other,
                    &["dpmsolver++", "dpmsolver", "deis (as dpmsolver++)"],
                ))
            }
        };
        let solver_type = match config.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(su::unsupported_value(
                    file,
                    "solver_type",
                    other,
                    &["midpoint", "heun", "logrho / bh1 / bh2 (as midpoint)"],
                ))
            }
        };
        let prediction = su::choose(
            file,
            "prediction_type",
            &config.prediction_type,
            &[
                ("epsilon", Prediction::Epsilon),
                ("sample", Prediction::Sample),
                ("v_prediction", Prediction::Velocity),
                ("flow_prediction", Prediction::Flow),
            ],
        )?;
        if prediction == Prediction::Flow && algorithm == Algorithm::DpmSolver {
            return Err(su::unsupported_value(
                file,
                "prediction_type",
                "flow_prediction",
                &[
                    "epsilon",
                    "sample",
                    "v_prediction (with algorithm_type dpmsolver)",
                ],
            ));
        }
        let spacing = su::choose(
            file,
            "timestep_spacing",
            &config.timestep_spacing,
            Spacing::ALL,
        )?;
        let final_sigmas = su::choose(
            file,
            "final_sigmas_type",
            &config.final_sigmas_type,
            &[
                ("zero", FinalSigmas::Zero),
                ("sigma_min", FinalSigmas::SigmaMin),
            ],
        )?;
        if algorithm == Algorithm::DpmSolver && final_sigmas == FinalSigmas::Zero {
            return Err(su::invalid_value(
                file,
                "final_sigmas_type",
                "`zero` is not supported with algorithm_type `dpmsolver`; choose `sigma_min`"
                    .into(),
            ));
        }
        if !(1..=3).contains(&config.solver_order) {
            return Err(su::unsupported_value(
                file,
                "solver_order",
                &config.solver_order.to_string(),
                &["1", "2", "3"],
            ));
        }
        let learned_variance = match config.variance_type.as_deref() {
            None => false,
            Some("learned") | Some("learned_range") => true,
            Some(other) => {
                return Err(su::unsupported_value(
                    file,
                    "variance_type",
                    other,
                    &["null", "learned", "learned_range"],
                ))
            }
        };
        let ramps = [
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
        ];
        if ramps.iter().filter(|(on, _)| *on).count() > 1 {
            return Err(su::invalid_value(
                file,
                "use_karras_sigmas",
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be set"
                    .into(),
            ));
        }
        for (on, field) in [
            (config.thresholding, "thresholding"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
            (config.use_lu_lambdas, "use_lu_lambdas"),
            (config.use_flow_sigmas, "use_flow_sigmas"),
            (config.use_dynamic_shifting, "use_dynamic_shifting"),
        ] {
            if on {
                return Err(su::unimplemented_option(
                    file,
                    field,
                    "`true` is not implemented",
                ));
            }
        }
        let schedule = su::choose(
            file,
            "beta_schedule",
            &config.beta_schedule,
            BetaSchedule::COMMON,
        )?;
        let betas = su::betas(&BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        });
        if betas.len() != config.num_train_timesteps || betas.is_empty() {
            return Err(su::invalid_value(
                file,
                "trained_betas",
                format!(
                    "has {} values, num_train_timesteps is {}",
                    betas.len(),
                    config.num_train_timesteps
                ),
            ));
        }
        let mut alphas_cumprod = su::alphas_cumprod(&betas);
        if config.rescale_betas_zero_snr {
            // Keeps the last sigma finite, as diffusers does.
            *alphas_cumprod.last_mut().expect("non-empty") = 2f32.powi(-24);
        }
        let sigmas = su::sigmas_from_alphas_cumprod(&alphas_cumprod);
        Ok(Self {
            config,
            algorithm,
            solver_type,
            prediction,
            spacing,
            final_sigmas,
            learned_variance,
            alphas_cumprod,
            sigmas,
            timesteps: Vec::new(),
        })
    }

    /// Builds the scheduler from a parsed `scheduler_config.json` (the registry's entry point).
    pub fn from_config(value: &serde_json::Value, file: &Path) -> Result<Self> {
        Self::new(su::parse_config(value, file)?, file)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The training-time `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The schedule's sigmas, one per timestep plus the final one (float32).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// How many training timesteps remain after `lambda_min_clipped` cuts the noisiest off.
    fn last_timestep(&self) -> usize {
        let clip = self.config.lambda_min_clipped as f32;
        // lambda(t) = log(alpha_t) - log(sigma_t) falls with t; count the values below the clip.
        let clipped = self
            .alphas_cumprod
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .filter(|&l| l < clip)
            .count();
        self.config.num_train_timesteps - clipped
    }

    fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let last = self.last_timestep();
        match self.spacing {
            Spacing::Linspace => {
                let mut t: Vec<f64> = su::numpy_linspace(0.0, last as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(su::np_round)
                    .collect();
                t.reverse();
                t.truncate(n);
                t
            }
            Spacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = self.config.num_train_timesteps as f64 / n as f64;
                su::numpy_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| su::np_round(t) - 1.0)
                    .collect()
            }
        }
    }

    /// (alpha_t, sigma_t) of a noise level, in float32.
    fn alpha_sigma(sigma: f32) -> (f32, f32) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    fn lambda(alpha: f32, sigma: f32) -> f32 {
        alpha.ln() - sigma.ln()
    }

    /// The model output as the solver's variable: x0 for DPM-Solver++, epsilon for DPM-Solver.
    fn convert_model_output(
        &self,
        index: usize,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let model_output = if self.learned_variance && self.prediction == Prediction::Epsilon {
            // diffusers keeps the first three channels of a learned-variance output.
            model_output.narrow(1, 0, 3)?
        } else {
            model_output.clone()
        };
        let sigma = self.sigmas[index];
        let (alpha_t, sigma_t) = Self::alpha_sigma(sigma);
        match (self.algorithm, self.prediction) {
            (Algorithm::DpmSolverPP, Prediction::Epsilon) => {
                su::div(&(sample - su::mul(&model_output, sigma_t)?)?, alpha_t)
            }
            (Algorithm::DpmSolverPP, Prediction::Sample) => Ok(model_output),
            (Algorithm::DpmSolverPP, Prediction::Velocity) => {
                Ok((su::mul(sample, alpha_t)? - su::mul(&model_output, sigma_t)?)?)
            }
            (Algorithm::DpmSolverPP, Prediction::Flow) => {
                Ok((sample - su::mul(&model_output, sigma)?)?)
            }
            (Algorithm::DpmSolver, Prediction::Epsilon) => Ok(model_output),
            (Algorithm::DpmSolver, Prediction::Sample) => {
                su::div(&(sample - su::mul(&model_output, alpha_t)?)?, sigma_t)
            }
            (Algorithm::DpmSolver, Prediction::Velocity) => {
                Ok((su::mul(&model_output, alpha_t)? + su::mul(sample, sigma_t)?)?)
            }
            (Algorithm::DpmSolver, Prediction::Flow) => unreachable!("refused in new()"),
        }
    }

    /// (alpha, sigma, lambda) at sigma index `i`.
    fn point(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = Self::alpha_sigma(self.sigmas[i]);
        (alpha, sigma, Self::lambda(alpha, sigma))
    }

    fn first_order_update(&self, index: usize, m0: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.point(index + 1);
        let (alpha_s, sigma_s, lambda_s) = self.point(index);
        let h = lambda_t - lambda_s;
        match self.algorithm {
            Algorithm::DpmSolverPP => {
                Ok((su::mul(sample, sigma_t / sigma_s)?
                    - su::mul(m0, alpha_t * ((-h).exp() - 1.0))?)?)
            }
            Algorithm::DpmSolver => Ok(
                (su::mul(sample, alpha_t / alpha_s)? - su::mul(m0, sigma_t * (h.exp() - 1.0))?)?
            ),
        }
    }

    fn second_order_update(
        &self,
        index: usize,
        history: &[Tensor],
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.point(index + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(index);
        let (_, _, lambda_s1) = self.point(index - 1);
        let (m0, m1) = (&history[history.len() - 1], &history[history.len() - 2]);
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d0 = m0;
        let d1 = su::mul(&(m0 - m1)?, 1.0 / r0)?;
        let x = match (self.algorithm, self.solver_type) {
            (Algorithm::DpmSolverPP, SolverType::Midpoint) => {
                let c = alpha_t * ((-h).exp() - 1.0);
                ((su::mul(sample, sigma_t / sigma_s0)? - su::mul(d0, c)?)?
                    - su::mul(&d1, 0.5 * c)?)?
            }
            (Algorithm::DpmSolverPP, SolverType::Heun) => {
                let c = alpha_t * ((-h).exp() - 1.0);
                let c1 = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
                ((su::mul(sample, sigma_t / sigma_s0)? - su::mul(d0, c)?)? + su::mul(&d1, c1)?)?
            }
            (Algorithm::DpmSolver, SolverType::Midpoint) => {
                let c = sigma_t * (h.exp() - 1.0);
                ((su::mul(sample, alpha_t / alpha_s0)? - su::mul(d0, c)?)?
                    - su::mul(&d1, 0.5 * c)?)?
            }
            (Algorithm::DpmSolver, SolverType::Heun) => {
                let c = sigma_t * (h.exp() - 1.0);
                let c1 = sigma_t * ((h.exp() - 1.0) / h - 1.0);
                ((su::mul(sample, alpha_t / alpha_s0)? - su::mul(d0, c)?)? - su::mul(&d1, c1)?)?
            }
        };
        Ok(x)
    }

    fn third_order_update(
        &self,
        index: usize,
        history: &[Tensor],
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.point(index + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(index);
        let (_, _, lambda_s1) = self.point(index - 1);
        let (_, _, lambda_s2) = self.point(index - 2);
        let n = history.len();
        let (m0, m1, m2) = (&history[n - 1], &history[n - 2], &history[n - 3]);
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda_s1) / h;
        let r1 = (lambda_s1 - lambda_s2) / h;
        let d0 = m0;
        let d1_0 = su::mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = su::mul(&(m1 - m2)?, 1.0 / r1)?;
        let d1_diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + su::mul(&d1_diff, r0 / (r0 + r1))?)?;
        let d2 = su::mul(&d1_diff, 1.0 / (r0 + r1))?;
        let x = match self.algorithm {
            Algorithm::DpmSolverPP => {
                let e = (-h).exp() - 1.0;
                let c0 = alpha_t * e;
                let c1 = alpha_t * (e / h + 1.0);
                let c2 = alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5);
                (((su::mul(sample, sigma_t / sigma_s0)? - su::mul(d0, c0)?)? + su::mul(&d1, c1)?)?
                    - su::mul(&d2, c2)?)?
            }
            Algorithm::DpmSolver => {
                let e = h.exp() - 1.0;
                let c0 = sigma_t * e;
                let c1 = sigma_t * (e / h - 1.0);
                let c2 = sigma_t * ((h.exp() - 1.0 - h) / (h * h) - 0.5);
                (((su::mul(sample, alpha_t / alpha_s0)? - su::mul(d0, c0)?)? - su::mul(&d1, c1)?)?
                    - su::mul(&d2, c2)?)?
            }
        };
        Ok(x)
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(Error::invalid(format!(
                "{CLASS_NAME}: num_inference_steps must be > 0"
            )));
        }
        let table = su::sigmas_from_alphas_cumprod(&self.alphas_cumprod);
        let mut timesteps = self.spaced_timesteps(num_inference_steps);
        let mut sigmas: Vec<f64> = if self.config.use_karras_sigmas {
            let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            let karras = su::karras_sigmas(
                table[0] as f64,
                *table.last().expect("non-empty") as f64,
                num_inference_steps,
            );
            timesteps = karras
                .iter()
                .map(|&s| {
                    let t = su::sigma_to_t(s, &log_sigmas);
                    if self.config.beta_schedule == "squaredcos_cap_v2" {
                        t
                    } else {
                        su::np_round(t)
                    }
                })
                .collect();
            karras
        } else {
            timesteps
                .iter()
                .map(|&t| su::interp_unit_grid(t, &table))
                .collect()
        };
        sigmas.push(match self.final_sigmas {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => su::sigma_of(self.alphas_cumprod[0]) as f64,
        });
        self.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        // diffusers stores them as int64.
        self.timesteps = timesteps.into_iter().map(|t| t.trunc()).collect();
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
        let _ = generator;
        let index = state.step_index;
        let n = self.timesteps.len();
        su::check_step(CLASS_NAME, index, n)?;
        let order = self.config.solver_order;
        let lower_order_final = index == n - 1
            && (self.config.euler_at_final
                || (self.config.lower_order_final && n < 15)
                || self.final_sigmas == FinalSigmas::Zero);
        let lower_order_second = index + 2 == n && self.config.lower_order_final && n < 15;

        let out_dtype = model_output.dtype();
        let sample = su::to_f32(sample)?;
        let converted = self.convert_model_output(index, &su::to_f32(model_output)?, &sample)?;
        state.model_outputs.push(converted);
        if state.model_outputs.len() > order {
            state.model_outputs.remove(0);
        }
        let history = &state.model_outputs;
        let prev = if order == 1 || state.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(index, &history[history.len() - 1], &sample)?
        } else if order == 2 || state.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(index, history, &sample)?
        } else {
            self.third_order_update(index, history, &sample)?
        };
        if state.lower_order_nums < order {
            state.lower_order_nums += 1;
        }
        state.step_index += 1;
        Ok(prev.to_dtype(out_dtype)?)
    }
}

fn from_config(value: &serde_json::Value, file: &Path) -> Result<Box<dyn Scheduler>> {
    Ok(Box::new(DPMSolverMultistepScheduler::from_config(
        value, file,
    )?))
}

xfuser_core::inventory::submit! {
    SchedulerEntry { class_name: CLASS_NAME, from_config }
}

impl crate::StepWithNoise for DPMSolverMultistepScheduler {
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
        self.step(state, model_output, sample, None)
    }
}
