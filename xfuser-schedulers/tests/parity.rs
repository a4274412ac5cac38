//! Parity with diffusers 0.42.1: each case in `tests/fixtures/schedulers/` (written by
//! `scripts/fixtures/schedulers.py`) is replayed twice — step by step on diffusers' own inputs
//! (each step's output within rel-L2 1e-6), and as a free-running loop from the first sample
//! (every output within 1e-5) — after checking that the schedule is identical.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use xfuser_core::scheduler::Scheduler;
use xfuser_core::testing::{fixtures_dir, load_goldens, rel_l2};
use xfuser_schedulers::*;

const STEP_TOL: f64 = 1e-6;
const LOOP_TOL: f64 = 1e-5;

struct Case {
    name: &'static str,
    dir: PathBuf,
    steps: usize,
    extra: serde_json::Value,
    goldens: HashMap<String, Tensor>,
}

impl Case {
    fn load(name: &'static str) -> Self {
        let dir = fixtures_dir().join("schedulers").join(name);
        let extra: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let steps = extra["num_inference_steps"].as_u64().unwrap() as usize;
        let goldens = load_goldens(&dir.join("goldens.safetensors")).unwrap();
        Self {
            name,
            dir,
            steps,
            extra,
            goldens,
        }
    }

    fn config(&self) -> (serde_json::Value, PathBuf) {
        let file = self.dir.join("scheduler_config.json");
        (xfuser_core::config::read_json_value(&file).unwrap(), file)
    }

    fn get(&self, key: &str) -> Option<&Tensor> {
        self.goldens.get(key)
    }

    fn tensor(&self, key: &str) -> &Tensor {
        self.get(key)
            .unwrap_or_else(|| panic!("{}: no golden `{key}`", self.name))
    }

    fn f64s(&self, key: &str) -> Vec<f64> {
        self.tensor(key)
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn f32s(&self, key: &str) -> Vec<f32> {
        self.tensor(key).to_vec1().unwrap()
    }
}

/// What a case needs of a scheduler beyond the trait: its case-specific setup and its tables.
trait UnderTest: StepWithNoise + Sized {
    fn build(case: &Case) -> Self;
    fn prepare(&mut self, case: &Case) {
        self.set_timesteps(case.steps).unwrap();
    }
    fn alphas_cumprod(&self) -> Option<&[f32]> {
        None
    }
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
}

impl UnderTest for DPMSolverMultistepScheduler {
    fn build(case: &Case) -> Self {
        let (value, file) = case.config();
        Self::from_config(&value, &file).unwrap()
    }
    fn alphas_cumprod(&self) -> Option<&[f32]> {
        Some(DPMSolverMultistepScheduler::alphas_cumprod(self))
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(DPMSolverMultistepScheduler::sigmas(self))
    }
}

impl UnderTest for DDIMScheduler {
    fn build(case: &Case) -> Self {
        let (value, file) = case.config();
        let mut s = Self::from_config(&value, &file).unwrap();
        if let Some(eta) = case.extra.get("eta") {
            s.set_eta(eta.as_f64().unwrap());
        }
        s
    }
    fn alphas_cumprod(&self) -> Option<&[f32]> {
        Some(DDIMScheduler::alphas_cumprod(self))
    }
}

impl UnderTest for DDPMScheduler {
    fn build(case: &Case) -> Self {
        let (value, file) = case.config();
        Self::from_config(&value, &file).unwrap()
    }
    fn alphas_cumprod(&self) -> Option<&[f32]> {
        Some(DDPMScheduler::alphas_cumprod(self))
    }
}

impl UnderTest for EulerDiscreteScheduler {
    fn build(case: &Case) -> Self {
        let (value, file) = case.config();
        Self::from_config(&value, &file).unwrap()
    }
    fn alphas_cumprod(&self) -> Option<&[f32]> {
        Some(EulerDiscreteScheduler::alphas_cumprod(self))
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(EulerDiscreteScheduler::sigmas(self))
    }
}

impl UnderTest for FlowMatchEulerDiscreteScheduler {
    fn build(case: &Case) -> Self {
        let (value, file) = case.config();
        Self::from_config(&value, &file).unwrap()
    }
    fn prepare(&mut self, case: &Case) {
        match case.extra.get("mu") {
            Some(mu) => self
                .set_timesteps_with_mu(case.steps, mu.as_f64().unwrap())
                .unwrap(),
            None => self.set_timesteps(case.steps).unwrap(),
        }
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(FlowMatchEulerDiscreteScheduler::sigmas(self))
    }
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if x == y {
                0.0
            } else {
                ((x - y) as f64 / y as f64).abs()
            }
        })
        .fold(0.0, f64::max)
}

fn check_case<S: UnderTest>(name: &'static str) {
    let case = Case::load(name);
    let mut s = S::build(&case);
    S::prepare(&mut s, &case);

    assert_eq!(
        s.timesteps(),
        case.f64s("timesteps").as_slice(),
        "{name}: timesteps"
    );
    assert_eq!(
        s.init_noise_sigma(),
        case.f64s("init_noise_sigma")[0],
        "{name}: init_noise_sigma"
    );
    if let Some(acp) = s.alphas_cumprod() {
        let d = max_rel_diff(acp, &case.f32s("alphas_cumprod"));
        assert!(d <= 1e-6, "{name}: alphas_cumprod max rel diff {d:e}");
        println!("{name}: alphas_cumprod max rel diff {d:e}");
    }
    if let Some(sig) = s.sigmas() {
        let d = max_rel_diff(sig, &case.f32s("sigmas"));
        assert!(d <= 1e-6, "{name}: sigmas max rel diff {d:e}");
        println!("{name}: sigmas max rel diff {d:e}");
    }

    let n = s.timesteps().len();
    // Step by step on diffusers' inputs.
    let mut state = s.new_state();
    let mut worst_step = 0f64;
    for i in 0..n {
        let input = if i == 0 {
            case.tensor("sample_0").clone()
        } else {
            case.tensor(&format!("prev_{}", i - 1)).clone()
        };
        if let Some(scaled) = case.get(&format!("scaled_{i}")) {
            let e = rel_l2(&s.scale_model_input(&state, &input).unwrap(), scaled).unwrap();
            assert!(e <= STEP_TOL, "{name}: scale_model_input {i}: rel L2 {e:e}");
        }
        let noise = case.get(&format!("noise_{i}"));
        assert_eq!(
            noise.is_some(),
            s.step_needs_noise(&state),
            "{name}: step {i} noise"
        );
        let out = s
            .step_with_noise(
                &mut state,
                case.tensor(&format!("model_output_{i}")),
                &input,
                noise,
            )
            .unwrap();
        let e = rel_l2(&out, case.tensor(&format!("prev_{i}"))).unwrap();
        assert!(e <= STEP_TOL, "{name}: step {i}: rel L2 {e:e}");
        worst_step = worst_step.max(e);
    }
    // Free-running from the first sample.
    let mut state = s.new_state();
    let mut x = case.tensor("sample_0").clone();
    let mut worst_loop = 0f64;
    for i in 0..n {
        let noise = case.get(&format!("noise_{i}"));
        x = s
            .step_with_noise(
                &mut state,
                case.tensor(&format!("model_output_{i}")),
                &x,
                noise,
            )
            .unwrap();
        let e = rel_l2(&x, case.tensor(&format!("prev_{i}"))).unwrap();
        assert!(e <= LOOP_TOL, "{name}: loop step {i}: rel L2 {e:e}");
        worst_loop = worst_loop.max(e);
    }
    assert_eq!(state.step_index, n);
    println!("{name}: {n} steps, max step rel L2 {worst_step:e}, max loop rel L2 {worst_loop:e}");
}

macro_rules! parity {
    ($($test:ident: $ty:ty,)*) => {
        $(
            #[test]
            fn $test() {
                check_case::<$ty>(stringify!($test));
            }
        )*
    };
}

parity! {
    dpm_pixart: DPMSolverMultistepScheduler,
    dpm_pixart_few: DPMSolverMultistepScheduler,
    dpm_order3_heun_vpred: DPMSolverMultistepScheduler,
    dpm_order3_midpoint_scaled: DPMSolverMultistepScheduler,
    dpm_dpmsolver_heun_sigma_min: DPMSolverMultistepScheduler,
    dpm_dpmsolver_order3_sample: DPMSolverMultistepScheduler,
    dpm_karras: DPMSolverMultistepScheduler,
    dpm_leading_order1: DPMSolverMultistepScheduler,
    dpm_trailing_euler_final: DPMSolverMultistepScheduler,
    dpm_cosine_lambda_clip: DPMSolverMultistepScheduler,
    dpm_zero_snr_vpred: DPMSolverMultistepScheduler,
    ddim_leading_clip: DDIMScheduler,
    ddim_eta_trailing_vpred: DDIMScheduler,
    ddim_linspace_sample: DDIMScheduler,
    euler_linspace: EulerDiscreteScheduler,
    euler_leading_karras_vpred: EulerDiscreteScheduler,
    euler_trailing_sigma_min: EulerDiscreteScheduler,
    ddpm_fixed_small: DDPMScheduler,
    ddpm_fixed_large_vpred_trailing: DDPMScheduler,
    ddpm_small_log_linspace: DDPMScheduler,
    flow_default: FlowMatchEulerDiscreteScheduler,
    flow_shift3: FlowMatchEulerDiscreteScheduler,
    flow_dynamic_terminal: FlowMatchEulerDiscreteScheduler,
}
