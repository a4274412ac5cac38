//! The registry entries, config errors, and the property PipeFusion relies on: stepping a
//! slice of the latent with its own state gives that slice of the whole-latent step.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;
use xfuser_core::registry::{self, Kind};
use xfuser_core::scheduler::Scheduler;
use xfuser_core::Error;
use xfuser_schedulers::*;

fn build(config: serde_json::Value) -> xfuser_core::Result<Box<dyn Scheduler>> {
    let file = Path::new("model/scheduler/scheduler_config.json");
    let name = config["_class_name"].as_str().unwrap().to_string();
    (registry::scheduler_entry(&name, &config)?.from_config)(&config, file)
}

fn error_of(config: serde_json::Value) -> String {
    match build(config) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_class_is_registered_and_builds_from_defaults() {
    let registered = registry::registered(Kind::Scheduler);
    for name in CLASS_NAMES {
        assert!(registered.contains(name), "{name} not in {registered:?}");
        let mut s = build(json!({ "_class_name": name })).unwrap();
        assert_eq!(s.class_name(), *name);
        s.set_timesteps(10).unwrap();
        assert_eq!(s.timesteps().len(), 10, "{name}");
    }
}

#[test]
fn unknown_class_lists_the_registered_ones() {
    let err = match registry::scheduler_entry("NoSuchScheduler", &json!({})) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("NoSuchScheduler"), "{err}");
    assert!(err.contains("DPMSolverMultistepScheduler"), "{err}");
}

#[test]
fn mistyped_field_is_named() {
    let err =
        error_of(json!({ "_class_name": "DPMSolverMultistepScheduler", "solver_order": "two" }));
    assert!(err.contains("scheduler_config.json"), "{err}");
    assert!(err.contains("field `solver_order`"), "{err}");
    let err = error_of(json!({ "_class_name": "DDIMScheduler", "clip_sample": 3 }));
    assert!(err.contains("field `clip_sample`"), "{err}");
}

#[test]
fn unknown_option_values_name_field_value_and_choices() {
    let err =
        error_of(json!({ "_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "cubic" }));
    assert!(
        err.contains("field `beta_schedule`") && err.contains("`cubic`"),
        "{err}"
    );
    assert!(err.contains("scaled_linear"), "{err}");
    let err = error_of(
        json!({ "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "unipc" }),
    );
    assert!(
        err.contains("field `algorithm_type`") && err.contains("dpmsolver++"),
        "{err}"
    );
    let err =
        error_of(json!({ "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "even" }));
    assert!(
        err.contains("field `timestep_spacing`") && err.contains("trailing"),
        "{err}"
    );
    let err = error_of(json!({ "_class_name": "DPMSolverMultistepScheduler", "solver_order": 4 }));
    assert!(err.contains("field `solver_order`"), "{err}");
}

#[test]
fn unimplemented_options_are_unsupported_errors() {
    for (class, field, value) in [
        ("DPMSolverMultistepScheduler", "thresholding", json!(true)),
        (
            "DPMSolverMultistepScheduler",
            "algorithm_type",
            json!("sde-dpmsolver++"),
        ),
        ("DPMSolverMultistepScheduler", "use_lu_lambdas", json!(true)),
        ("DDIMScheduler", "thresholding", json!(true)),
        ("DDPMScheduler", "variance_type", json!("learned_range")),
        ("EulerDiscreteScheduler", "use_beta_sigmas", json!(true)),
        (
            "FlowMatchEulerDiscreteScheduler",
            "use_beta_sigmas",
            json!(true),
        ),
    ] {
        let mut config = json!({ "_class_name": class });
        config[field] = value;
        match build(config) {
            Err(Error::Unsupported(m)) => assert!(m.contains(field), "{m}"),
            Err(e) => panic!("{class}.{field}: expected Unsupported, got {e}"),
            Ok(_) => panic!("{class}.{field}: expected an error"),
        }
    }
}

#[test]
fn dpmsolver_with_zero_final_sigma_is_refused_as_diffusers_does() {
    let err = error_of(
        json!({ "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver" }),
    );
    assert!(err.contains("final_sigmas_type"), "{err}");
}

#[test]
fn dynamic_shifting_needs_mu() {
    let mut s = build(
        json!({ "_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": true }),
    )
    .unwrap();
    let err = s.set_timesteps(10).unwrap_err().to_string();
    assert!(err.contains("mu"), "{err}");
}

#[test]
fn stochastic_step_without_generator_is_an_error() {
    let mut s = build(json!({ "_class_name": "DDPMScheduler" })).unwrap();
    s.set_timesteps(5).unwrap();
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut state = s.new_state();
    let err = s.step(&mut state, &x, &x, None).unwrap_err().to_string();
    assert!(err.contains("generator"), "{err}");
    assert_eq!(state.step_index, 0);
}

#[test]
fn step_past_the_schedule_is_an_error() {
    let mut s = build(json!({ "_class_name": "EulerDiscreteScheduler" })).unwrap();
    s.set_timesteps(1).unwrap();
    let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut state = s.new_state();
    s.step(&mut state, &x, &x, None).unwrap();
    assert!(s.step(&mut state, &x, &x, None).is_err());
}

/// Runs `steps` steps of `s` on `x` with one state, the model output a fixed function of
/// the step and the sample.
fn denoise(s: &dyn Scheduler, x: &Tensor, eps: &[Tensor]) -> Tensor {
    let mut state = s.new_state();
    let mut x = x.clone();
    for e in eps {
        let input = s.scale_model_input(&state, &x).unwrap();
        let model_output = ((input * 0.3).unwrap() + e).unwrap();
        x = s.step(&mut state, &model_output, &x, None).unwrap();
    }
    x
}

#[test]
fn patches_with_their_own_state_equal_the_whole_latent() {
    let dev = Device::Cpu;
    for config in [
        json!({ "_class_name": "DPMSolverMultistepScheduler", "solver_order": 3 }),
        json!({ "_class_name": "DPMSolverMultistepScheduler" }),
        json!({ "_class_name": "EulerDiscreteScheduler" }),
        json!({ "_class_name": "DDIMScheduler" }),
        json!({ "_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0 }),
    ] {
        let mut s = build(config.clone()).unwrap();
        s.set_timesteps(12).unwrap();
        // (B, C, H, W) latents; PipeFusion patches are row ranges.
        let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 6), &dev).unwrap();
        let eps: Vec<Tensor> = (0..12)
            .map(|_| Tensor::randn(0f32, 1.0, (2, 4, 8, 6), &dev).unwrap())
            .collect();
        let whole = denoise(s.as_ref(), &x, &eps);
        let mut parts = Vec::new();
        for (start, len) in [(0, 3), (3, 2), (5, 3)] {
            let xe: Vec<Tensor> = eps
                .iter()
                .map(|e| e.narrow(2, start, len).unwrap())
                .collect();
            parts.push(denoise(s.as_ref(), &x.narrow(2, start, len).unwrap(), &xe));
        }
        let patched = Tensor::cat(&parts, 2).unwrap();
        let diff = xfuser_core::testing::max_abs_diff(&patched, &whole).unwrap();
        assert_eq!(diff, 0.0, "{config}");
    }
}

/// diffusers' `set_timesteps(n, sigmas=..., mu=...)` (FluxPipeline's): the custom sigmas cast
/// to float32, shifted in float32, timesteps sigma · 1000; other schedulers refuse them.
#[test]
fn custom_sigmas_are_shifted_in_f32() {
    use xfuser_core::scheduler::TimestepOptions;
    let mut s = build(json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "use_dynamic_shifting": true,
        "shift": 3.0,
    }))
    .unwrap();
    let custom = vec![1.0, 0.75, 0.5, 0.25];
    let mu = 0.6_f64;
    let options = TimestepOptions {
        mu: Some(mu),
        sigmas: Some(custom.clone()),
    };
    s.set_timesteps_with(4, &options).unwrap();
    let e = mu.exp() as f32;
    let expected: Vec<f64> = custom
        .iter()
        .map(|&c| {
            let t = c as f32;
            ((e / (e + (1.0 / t - 1.0))) * 1000.0) as f64
        })
        .collect();
    assert_eq!(s.timesteps(), expected.as_slice());
    // Without custom sigmas the schedule differs (linspace down to sigma_min).
    let mut default = build(json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "use_dynamic_shifting": true,
    }))
    .unwrap();
    let options = TimestepOptions {
        mu: Some(mu),
        ..Default::default()
    };
    default.set_timesteps_with(4, &options).unwrap();
    assert_ne!(default.timesteps(), expected.as_slice());

    let wrong = TimestepOptions {
        mu: Some(mu),
        sigmas: Some(vec![1.0, 0.5]),
    };
    let err = s.set_timesteps_with(4, &wrong).unwrap_err().to_string();
    assert!(err.contains("2 custom sigmas for 4 steps"), "{err}");

    let mut ddim = build(json!({ "_class_name": "DDIMScheduler" })).unwrap();
    let err = ddim
        .set_timesteps_with(
            4,
            &TimestepOptions {
                sigmas: Some(custom),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("takes no custom `sigmas`"), "{err}");
}
