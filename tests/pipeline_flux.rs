//! The Flux.1 pipeline end to end against diffusers on the tiny fixtures (tests/fixtures/flux,
//! made by scripts/fixtures/flux.py): dev (guidance embedding, dynamically shifted schedule)
//! and schnell (neither); prompt embeddings (T5 sequence, CLIP pooled output) rel L2 ≤ 1e-5;
//! the initial noise drawn in diffusers' unpacked layout; final latents from a seed, unpacked
//! to (B, 16, H/8, W/8) (rel L2 ≤ 1e-4) and decoded images (≤ 2/255 per pixel), square,
//! non-square and with true CFG. Then bad input: one-line errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xfuser::core::engine::{EngineConfig, InputConfig, OutputType, ParallelConfig};
use xfuser::core::testing::{
    copy_dir, fixtures_dir, images_max_abs_diff, load_goldens, max_abs_diff, read_case, rel_l2,
};
use xfuser::pipelines::pipeline_flux::FluxPipeline;
use xfuser::pipelines::runtime::DenoisingPipeline;
use xfuser::pipelines::xFuserPipeline;

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    prompts: Vec<String>,
    negative_prompt: String,
    true_cfg_scale: f64,
    height: usize,
    width: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
    seed: u64,
    max_sequence_length: usize,
}

fn flux_dir() -> PathBuf {
    fixtures_dir().join("flux")
}

fn case(name: &str) -> Case {
    read_case(&flux_dir().join("goldens/cases.json"), name).expect("case")
}

fn input(case: &Case, output_type: OutputType) -> InputConfig {
    InputConfig {
        prompts: case.prompts.clone(),
        negative_prompt: case.negative_prompt.clone(),
        true_cfg_scale: case.true_cfg_scale,
        height: Some(case.height),
        width: Some(case.width),
        num_inference_steps: case.num_inference_steps,
        guidance_scale: case.guidance_scale,
        seed: case.seed,
        output_type,
        max_sequence_length: Some(case.max_sequence_length),
        ..Default::default()
    }
}

/// Runs case `name` through the registry-dispatched pipeline and checks embeddings, noise,
/// latents and image.
fn check_pipeline(name: &str) {
    let case = case(name);
    let golden =
        load_goldens(&flux_dir().join(format!("goldens/{name}.safetensors"))).expect("goldens");
    let dir = flux_dir().join(&case.model);

    let pipeline = FluxPipeline::load(&dir, &EngineConfig::new("unused")).unwrap();
    let embeds = pipeline
        .encode_prompt(&case.prompts, 1, case.max_sequence_length)
        .unwrap();
    for (key, ours) in [
        ("prompt_embeds", &embeds.prompt_embeds),
        ("pooled_prompt_embeds", &embeds.pooled_prompt_embeds),
    ] {
        let err = rel_l2(ours, &golden[key]).unwrap();
        println!("{name}: {key} rel L2 = {err:.3e}");
        assert!(err <= 1e-5, "{name}: {key} rel L2 {err:.3e} > 1e-5");
    }
    if case.true_cfg_scale > 1.0 {
        let negatives = vec![case.negative_prompt.clone(); case.prompts.len()];
        let embeds = pipeline
            .encode_prompt(&negatives, 1, case.max_sequence_length)
            .unwrap();
        let err = rel_l2(&embeds.prompt_embeds, &golden["negative_prompt_embeds"]).unwrap();
        println!("{name}: negative_prompt_embeds rel L2 = {err:.3e}");
        assert!(
            err <= 1e-5,
            "{name}: negative_prompt_embeds rel L2 {err:.3e}"
        );
    }
    // The noise, from the seed, in the unpacked layout.
    let noise = xfuser::core::random::Generator::manual_seed(case.seed)
        .randn_tensor(golden["initial_latents"].dims(), &Device::Cpu)
        .unwrap();
    assert_eq!(
        max_abs_diff(&noise, &golden["initial_latents"]).unwrap(),
        0.0
    );

    // The schedule: Flux's sigmas linspace(1, 1/n, n), shifted by mu for dev.
    let request = input(&case, OutputType::Latent);
    let (_, plan) = pipeline.plan(&request).unwrap();
    let job = pipeline.prepare(&plan, &request).unwrap();
    let timesteps = Tensor::new(job.scheduler.timesteps(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let err = max_abs_diff(&timesteps, &golden["timesteps"]).unwrap();
    println!("{name}: timesteps max abs diff = {err:.3e}");
    assert!(err <= 1e-3, "{name}: timesteps differ by {err:.3e}");

    let engine = EngineConfig::new(dir.to_string_lossy());
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("from_pretrained");
    assert_eq!(pipeline.class_name(), "FluxPipeline");
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
    let worst = images_max_abs_diff(&out.images, &golden["image"]).unwrap();
    println!("{name}: image max abs diff = {:.2}/255", worst * 255.0);
    assert!(
        worst <= 2.0 / 255.0,
        "{name}: image differs by {:.2}/255",
        worst * 255.0
    );
}

#[test]
fn dev_square() {
    check_pipeline("dev_square");
}

#[test]
fn dev_nonsquare() {
    check_pipeline("dev_nonsquare");
}

#[test]
fn schnell_ignores_the_guidance_scale() {
    check_pipeline("schnell");
    let pipeline = FluxPipeline::load(
        &flux_dir().join("tiny-flux-schnell"),
        &EngineConfig::new("x"),
    )
    .unwrap();
    assert!(!pipeline.guidance_embeds());
}

#[test]
fn dev_true_cfg() {
    check_pipeline("dev_true_cfg");
}

/// 3 token rows: serially, and over 2 ring ranks (padded) and 4 Ulysses×Ring ranks, against
/// diffusers' latents.
#[test]
fn dev_odd_rows() {
    check_pipeline("dev_odd_rows");
    let case = case("dev_odd_rows");
    let golden = load_goldens(&flux_dir().join("goldens/dev_odd_rows.safetensors")).unwrap();
    for (ulysses, ring) in [(1, 2), (2, 2)] {
        let mut engine = EngineConfig::new(flux_dir().join(&case.model).to_string_lossy());
        engine.parallel = ParallelConfig {
            ulysses_degree: ulysses,
            ring_degree: ring,
            ..Default::default()
        };
        let pipeline = xFuserPipeline::from_pretrained(&engine).unwrap();
        let out = pipeline
            .generate(&input(&case, OutputType::Latent), &mut |_, _| {})
            .unwrap();
        let err = rel_l2(&out.latents, &golden["latents"]).unwrap();
        println!("dev_odd_rows, ulysses {ulysses} ring {ring}: latents rel L2 {err:.3e}");
        assert!(err <= 1e-4, "ulysses {ulysses} ring {ring}: {err:.3e}");
    }
}

/// A copy of a fixture pipeline in the temp dir, removed on drop.
struct TempModel {
    dir: PathBuf,
}

impl TempModel {
    fn copy_of(model: &str, tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("xfuser-flux-{tag}-{}-{model}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&flux_dir().join(model), &dir).unwrap();
        Self { dir }
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn load_error(dir: &Path, parallel: ParallelConfig) -> String {
    let mut engine = EngineConfig::new(dir.to_string_lossy());
    engine.parallel = parallel;
    match xFuserPipeline::from_pretrained(&engine) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_text_encoder_2_is_named() {
    let model = TempModel::copy_of("tiny-flux-dev", "no-t5");
    let file = model.dir.join("model_index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    index["text_encoder_2"] = serde_json::json!([null, null]);
    std::fs::write(&file, index.to_string()).unwrap();
    let err = load_error(&model.dir, ParallelConfig::default());
    assert!(
        err.contains("text_encoder_2") && err.contains("FluxPipeline"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_height_not_a_multiple_of_16_is_refused() {
    let engine = EngineConfig::new(flux_dir().join("tiny-flux-dev").to_string_lossy());
    let pipeline = xFuserPipeline::from_pretrained(&engine).unwrap();
    let mut request = input(&case("dev_square"), OutputType::Latent);
    request.height = Some(72);
    let err = pipeline
        .generate(&request, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("--height 72") && err.contains("16"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn cfg_parallel_without_true_cfg_says_why() {
    let engine = {
        let mut e = EngineConfig::new(flux_dir().join("tiny-flux-dev").to_string_lossy());
        e.parallel.use_cfg_parallel = true;
        e
    };
    let pipeline = xFuserPipeline::from_pretrained(&engine).unwrap();
    // A guidance scale above 1 is Flux's embedded guidance, not CFG.
    let request = input(&case("dev_square"), OutputType::Latent);
    let err = pipeline
        .generate(&request, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "Flux uses guidance embedding, not classifier-free guidance: pass \
             --true-cfg-scale above 1 with a --negative-prompt"
        ),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
