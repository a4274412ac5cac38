//! What the discrete-time schedulers share: the beta schedules and `alphas_cumprod`, numpy's
//! and torch's ways of spacing numbers, the Karras sigma ramp, config errors, and the scalar
//! arithmetic on tensors.
//!
//! Diffusers builds its tables with torch float32 tensors and its timesteps with numpy float64,
//! then rounds; every function here reproduces one of those computations bit for bit where the
//! result feeds a timestep, so that the schedules come out identical, not merely close.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::de::DeserializeOwned;
use xfuser_core::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Configuration

/// Parses a scheduler config (already read as JSON) into `T`, with errors naming `file` and the
/// field, as every other config of the project.
pub(crate) fn parse_config<T: DeserializeOwned>(
    value: &serde_json::Value,
    file: &Path,
) -> Result<T> {
    xfuser_core::config::parse_json_config(&value.to_string(), file)
}

/// A config value this port does not know: names the file, the field, the value and what is
/// supported.
pub(crate) fn unsupported_value(
    file: &Path,
    field: &str,
    value: &str,
    supported: &[&str],
) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        field: field.to_string(),
        message: format!(
            "unsupported value `{value}`; supported: {}",
            supported.join(", ")
        ),
    }
}

/// A valid diffusers option that this port does not implement.
pub(crate) fn unimplemented_option(file: &Path, field: &str, what: &str) -> Error {
    Error::Unsupported(format!("{}: field `{field}`: {what}", file.display()))
}

/// A config value that diffusers itself rejects.
pub(crate) fn invalid_value(file: &Path, field: &str, message: String) -> Error {
    Error::Config {
        file: file.to_path_buf(),
        field: field.to_string(),
        message,
    }
}

/// Matches `value` of `field` against the supported spellings, in order.
pub(crate) fn choose<T: Copy>(
    file: &Path,
    field: &str,
    value: &str,
    options: &[(&str, T)],
) -> Result<T> {
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            unsupported_value(file, field, value, &names)
        })
}

/// `timestep_spacing`: how the inference timesteps are picked among the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    pub(crate) const ALL: &'static [(&'static str, Spacing)] = &[
        ("linspace", Spacing::Linspace),
        ("leading", Spacing::Leading),
        ("trailing", Spacing::Trailing),
    ];
}

// ---------------------------------------------------------------------------------------------
// Betas and alphas_cumprod

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
    /// DDPM only.
    Sigmoid,
    /// DDPM only.
    Laplace,
}

impl BetaSchedule {
    pub(crate) const COMMON: &'static [(&'static str, BetaSchedule)] = &[
        ("linear", BetaSchedule::Linear),
        ("scaled_linear", BetaSchedule::ScaledLinear),
        ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
    ];
    pub(crate) const DDPM: &'static [(&'static str, BetaSchedule)] = &[
        ("linear", BetaSchedule::Linear),
        ("scaled_linear", BetaSchedule::ScaledLinear),
        ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
        ("sigmoid", BetaSchedule::Sigmoid),
        ("laplace", BetaSchedule::Laplace),
    ];
}

/// The fields every discrete-time scheduler reads to build its betas.
pub(crate) struct BetaConfig<'a> {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub schedule: BetaSchedule,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
}

/// Diffusers' `self.betas` (float32).
pub(crate) fn betas(cfg: &BetaConfig) -> Vec<f32> {
    let n = cfg.num_train_timesteps;
    let betas = if let Some(trained) = cfg.trained_betas {
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => betas_for_alpha_bar(n, cosine_alpha_bar),
            BetaSchedule::Laplace => betas_for_alpha_bar(n, laplace_alpha_bar),
            BetaSchedule::Sigmoid => {
                let (start, range) = (
                    cfg.beta_start as f32,
                    (cfg.beta_end - cfg.beta_start) as f32,
                );
                torch_linspace_f32(-6.0, 6.0, n)
                    .into_iter()
                    .map(|x| (1.0 / (1.0 + (-x).exp())) * range + start)
                    .collect()
            }
        }
    };
    if cfg.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    }
}

/// `torch.cumprod(1 - betas)`: torch accumulates a float32 cumprod in float64 on the CPU and
/// rounds each partial product.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    cumprod_f32(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>())
}

fn cumprod_f32(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    xs.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

fn cosine_alpha_bar(t: f64) -> f64 {
    let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
    c * c
}

fn laplace_alpha_bar(t: f64) -> f64 {
    let lmb = -0.5 * (0.5 - t).signum() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
    let snr = lmb.exp();
    (snr / (1.0 + snr)).sqrt()
}

/// Betas whose cumulative product follows `alpha_bar` on [0, 1], capped at 0.999.
fn betas_for_alpha_bar(n: usize, alpha_bar: fn(f64) -> f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas to a zero terminal SNR (Lin et al. 2023, algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().expect("at least one beta");
    let factor = first / (first - last);
    let bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|s| {
            let s = (s - last) * factor;
            s * s
        })
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32.
pub(crate) fn sigmas_from_alphas_cumprod(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| sigma_of(a)).collect()
}

pub(crate) fn sigma_of(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

// ---------------------------------------------------------------------------------------------
// Spacing numbers as torch and numpy do

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: a float32 step, the first half
/// counted up from `start` and the second half down from `end`, each a fused multiply-add.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64: `i * step + start`, the last value exactly `stop`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

/// `np.arange(start, stop, step)` for floats: numpy writes `start` and `start + step`, then
/// fills `start + i * delta` with `delta` the difference of those two, over
/// `ceil((stop - start) / step)` values.
pub(crate) fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let next = start + step;
    let delta = next - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => next,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: halves to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn interp_unit_grid(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// Karras et al. (2022) sigmas: `num` values from `sigma_max` to `sigma_min`, even in
/// `sigma^(1/7)`, in float64 as diffusers computes them.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, num: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    numpy_linspace(0.0, 1.0, num)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Sigmas even in log space from `sigma_max` to `sigma_min`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, num: usize) -> Vec<f64> {
    numpy_linspace(sigma_max.ln(), sigma_min.ln(), num)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, interpolating linearly in
/// `log_sigmas` (float32, ascending with the timestep) as diffusers' `_sigma_to_t`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log-sigma is at most `log_sigma` (0 when none), kept off the end.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    // numpy subtracts the two float32 table entries in float32.
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

// ---------------------------------------------------------------------------------------------
// Tensor arithmetic with float32 scalars, one rounding per operation as torch does

/// `c * t` with `c` rounded to float32, as torch multiplies by a 0-dim float32 tensor.
pub(crate) fn mul(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.broadcast_mul(&Tensor::new(c, t.device())?.to_dtype(t.dtype())?)?)
}

/// `t / c`, a true division (not a multiplication by `1 / c`).
pub(crate) fn div(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&Tensor::new(c, t.device())?.to_dtype(t.dtype())?)?)
}

/// `t` in float32 (the schedulers' step arithmetic is float32, as diffusers').
pub(crate) fn to_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// Checks that a step at `index` exists in a schedule of `len` timesteps.
pub(crate) fn check_step(class: &str, index: usize, len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::invalid(format!(
            "{class}: call set_timesteps before step"
        )));
    }
    if index >= len {
        return Err(Error::invalid(format!(
            "{class}: step index {index} is past the last of {len} timesteps"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_arange_counts_like_numpy() {
        let v = numpy_arange(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], 1000.0);
        assert!((v[2] - 333.333_333).abs() < 1e-3);
    }

    #[test]
    fn linspace_ends_exactly() {
        let v = numpy_linspace(0.0, 999.0, 21);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[20], 999.0);
        let t = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(t[0], 0.0001f32);
        assert_eq!(t[999], 0.02f32);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let log_sigmas: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 2.0).collect();
        let t = sigma_to_t((0.25f64 - 2.0).exp(), &log_sigmas);
        assert!((t - 0.5).abs() < 1e-6, "{t}");
        assert_eq!(sigma_to_t(1e-20, &log_sigmas), 0.0);
        assert_eq!(sigma_to_t(1e9, &log_sigmas), 9.0);
    }
}

/// serde defaults shared by the schedulers' configs: diffusers' values for the fields every
/// scheduler has.
pub(crate) mod defaults {
    pub(crate) fn num_train_timesteps() -> usize {
        1000
    }
    pub(crate) fn beta_start() -> f64 {
        0.0001
    }
    pub(crate) fn beta_end() -> f64 {
        0.02
    }
    pub(crate) fn beta_schedule() -> String {
        "linear".into()
    }
    pub(crate) fn prediction_type() -> String {
        "epsilon".into()
    }
    pub(crate) fn dynamic_thresholding_ratio() -> f64 {
        0.995
    }
    pub(crate) fn one() -> f64 {
        1.0
    }
    pub(crate) fn enabled() -> bool {
        true
    }
}
