//! The PixArt-α/Σ pipelines end to end against diffusers on the tiny fixtures: prompt
//! embeddings (rel L2 ≤ 1e-5), final latents from a seed (rel L2 ≤ 1e-4) and decoded images
//! (≤ 2/255 per pixel), with CFG on and off, square and non-square, with and without
//! resolution binning.

use std::path::PathBuf;

use xfuser::core::engine::{EngineConfig, InputConfig, OutputType};
use xfuser::core::testing::{fixtures_dir, images_max_abs_diff, load_goldens, read_case, rel_l2};
use xfuser::pipelines::pipeline_pixart_alpha::{PixArtPipeline, PIXART_ALPHA};
use xfuser::pipelines::pipeline_pixart_sigma::PIXART_SIGMA;
use xfuser::pipelines::xFuserPipeline;

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    prompts: Vec<String>,
    negative_prompt: String,
    height: usize,
    width: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
    seed: u64,
    max_sequence_length: usize,
    use_resolution_binning: bool,
}

fn pipelines_dir() -> PathBuf {
    fixtures_dir().join("pipelines")
}

fn case(name: &str) -> Case {
    read_case(&pipelines_dir().join("goldens/cases.json"), name).expect("case")
}

fn input(case: &Case, output_type: OutputType) -> InputConfig {
    InputConfig {
        prompts: case.prompts.clone(),
        negative_prompt: case.negative_prompt.clone(),
        height: Some(case.height),
        width: Some(case.width),
        num_inference_steps: case.num_inference_steps,
        guidance_scale: case.guidance_scale,
        seed: case.seed,
        output_type,
        max_sequence_length: Some(case.max_sequence_length),
        use_resolution_binning: case.use_resolution_binning,
        ..Default::default()
    }
}

/// Runs case `name` through the registry-dispatched pipeline and checks latents and image.
fn check_pipeline(name: &str) {
    let case = case(name);
    let golden = load_goldens(&pipelines_dir().join(format!("goldens/{name}.safetensors")))
        .expect("goldens");
    let engine = EngineConfig::new(pipelines_dir().join(&case.model).to_string_lossy());
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("from_pretrained");

    let mut steps = 0;
    let out = pipeline
        .generate(&input(&case, OutputType::Latent), &mut |_, _| steps += 1)
        .expect("generate latents");
    assert_eq!(steps, case.num_inference_steps);
    assert!(out.images.is_empty());
    let err = rel_l2(&out.latents, &golden["latents"]).unwrap();
    println!("{name}: latents rel L2 = {err:.3e}");
    assert!(err <= 1e-4, "{name}: latents rel L2 {err:.3e} > 1e-4");

    let out = pipeline
        .generate(&input(&case, OutputType::Pil), &mut |_, _| {})
        .expect("generate images");
    // (B, H, W, 3) f32 in [0, 1]
    let worst = images_max_abs_diff(&out.images, &golden["image"]).unwrap();
    println!("{name}: image max abs diff = {:.2}/255", worst * 255.0);
    assert!(
        worst <= 2.0 / 255.0,
        "{name}: image differs by {:.2}/255",
        worst * 255.0
    );
}

/// The text side alone: encode_prompt against diffusers' prompt embeddings and masks.
fn check_encode_prompt(name: &str) {
    let case = case(name);
    let golden = load_goldens(&pipelines_dir().join(format!("goldens/{name}.safetensors")))
        .expect("goldens");
    let spec = if case.model.contains("sigma") {
        &PIXART_SIGMA
    } else {
        &PIXART_ALPHA
    };
    let engine = EngineConfig::new("unused");
    let pipeline =
        PixArtPipeline::load(spec, &pipelines_dir().join(&case.model), &engine).expect("load");
    let text = pipeline
        .encode_prompt(&case.prompts, 1, case.max_sequence_length)
        .expect("encode_prompt");
    let err = rel_l2(&text.embeds, &golden["prompt_embeds"]).unwrap();
    assert!(err <= 1e-5, "{name}: prompt embeds rel L2 {err:.3e}");
    let mask: Vec<Vec<i64>> = text.mask.to_vec2().unwrap();
    let want: Vec<Vec<i64>> = golden["prompt_attention_mask"].to_vec2().unwrap();
    assert_eq!(mask, want, "{name}: prompt attention mask");
    if case.guidance_scale > 1.0 {
        let negatives = vec![case.negative_prompt.clone(); case.prompts.len()];
        let neg = pipeline
            .encode_prompt(&negatives, 1, case.max_sequence_length)
            .expect("negative encode_prompt");
        let err = rel_l2(&neg.embeds, &golden["negative_prompt_embeds"]).unwrap();
        assert!(err <= 1e-5, "{name}: negative embeds rel L2 {err:.3e}");
    }
}

macro_rules! pipeline_parity {
    ($($name:ident),* $(,)?) => {
        mod pipeline {$(
            #[test]
            fn $name() {
                super::check_pipeline(stringify!($name));
            }
        )*}
        mod encode_prompt {$(
            #[test]
            fn $name() {
                super::check_encode_prompt(stringify!($name));
            }
        )*}
    };
}

pipeline_parity!(
    alpha_square_cfg,
    alpha_nonsquare_nocfg,
    sigma_square_cfg_batch2,
    sigma_nonsquare_cfg,
    alpha_binning,
    sigma_binning,
    // The trained bundled model (tiny-pixart-shapes) at its defaults: 20 steps, guidance 4.5,
    // 120 text tokens.
    shapes_cfg,
);
