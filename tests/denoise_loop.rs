//! The PixArt denoising loop (transformer + scheduler + CFG) against diffusers, given the prompt
//! embeddings and initial noise diffusers used: final latents within rel-L2 1e-4.

use std::path::PathBuf;

use candle_core::Tensor;
use xfuser::core::backbone::ForwardContext;
use xfuser::core::registry::{load_scheduler, load_transformer, LoadOptions};
use xfuser::core::testing::{fixtures_dir, load_goldens, rel_l2};
use xfuser::pipelines::denoise::{denoise, Guidance, TextConditioning};

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    num_inference_steps: usize,
    guidance_scale: f64,
}

fn pipelines_dir() -> PathBuf {
    fixtures_dir().join("pipelines")
}

fn case(name: &str) -> Case {
    let file = pipelines_dir().join("goldens/cases.json");
    let all: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("cases.json")).expect("json");
    serde_json::from_value(all[name].clone()).expect("case fields")
}

fn run_loop(name: &str) -> (Tensor, Tensor) {
    let case = case(name);
    let model = pipelines_dir().join(&case.model);
    let golden = load_goldens(&pipelines_dir().join(format!("goldens/{name}.safetensors")))
        .expect("goldens");
    let backbone =
        load_transformer(&model.join("transformer"), &LoadOptions::default()).expect("transformer");
    let mut scheduler =
        load_scheduler(&model.join("scheduler/scheduler_config.json")).expect("scheduler");
    scheduler
        .set_timesteps(case.num_inference_steps)
        .expect("set_timesteps");
    let expected_timesteps: Vec<f64> = golden["timesteps"].to_vec1().expect("timesteps");
    assert_eq!(scheduler.timesteps(), expected_timesteps.as_slice());

    let text = |prefix: &str| {
        Some(TextConditioning {
            embeds: golden.get(&format!("{prefix}prompt_embeds"))?.clone(),
            mask: golden
                .get(&format!("{prefix}prompt_attention_mask"))?
                .clone(),
        })
    };
    let guidance = Guidance {
        positive: text("").expect("prompt embeddings"),
        negative: if case.guidance_scale > 1.0 {
            Some(text("negative_").expect("negative prompt embeddings"))
        } else {
            None
        },
        guidance_scale: case.guidance_scale,
        resolution: None,
        aspect_ratio: None,
    };
    let latents = (golden["initial_latents"].clone() * scheduler.init_noise_sigma()).unwrap();
    let mut steps = 0;
    let out = denoise(
        backbone.as_ref(),
        scheduler.as_ref(),
        latents,
        &guidance,
        &ForwardContext::default(),
        None,
        None,
        &mut |_, _| {
            steps += 1;
            Ok(())
        },
    )
    .expect("denoise");
    assert_eq!(steps, case.num_inference_steps);
    (out, golden["latents"].clone())
}

macro_rules! loop_parity {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let (ours, reference) = run_loop(stringify!($name));
            let err = rel_l2(&ours, &reference).unwrap();
            println!("{}: latents rel L2 = {err:.3e}", stringify!($name));
            assert!(err <= 1e-4, "{}: rel L2 {err:.3e} > 1e-4", stringify!($name));
        }
    )*};
}

loop_parity!(
    alpha_square_cfg,
    alpha_nonsquare_nocfg,
    sigma_square_cfg_batch2,
    sigma_nonsquare_cfg,
);
