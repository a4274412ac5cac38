//! The Stable Diffusion 3 pipeline end to end against diffusers on the tiny fixtures
//! (tests/fixtures/sd3, made by scripts/fixtures/sd3.py): prompt embeddings of both CLIP
//! encoders and T5 joined as diffusers joins them (rel L2 ≤ 1e-5), with and without
//! `text_encoder_3`; final latents from a seed (rel L2 ≤ 1e-4) and decoded images (≤ 2/255 per
//! pixel), square and non-square, with and without CFG. Then bad input: the errors name the
//! file or flag.

use std::path::{Path, PathBuf};

use xfuser::core::engine::{EngineConfig, InputConfig, OutputType, ParallelConfig};
use xfuser::core::testing::{
    copy_dir, fixtures_dir, images_max_abs_diff, load_goldens, read_case, rel_l2,
};
use xfuser::pipelines::pipeline_stable_diffusion_3::StableDiffusion3Pipeline;
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
}

fn sd3_dir() -> PathBuf {
    fixtures_dir().join("sd3")
}

fn case(name: &str) -> Case {
    read_case(&sd3_dir().join("goldens/cases.json"), name).expect("case")
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
        ..Default::default()
    }
}

/// Runs case `name` through the registry-dispatched pipeline and checks latents and image.
fn check_pipeline(name: &str) {
    let case = case(name);
    let golden =
        load_goldens(&sd3_dir().join(format!("goldens/{name}.safetensors"))).expect("goldens");
    let engine = EngineConfig::new(sd3_dir().join(&case.model).to_string_lossy());
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("from_pretrained");
    assert_eq!(pipeline.class_name(), "StableDiffusion3Pipeline");

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

#[test]
fn square_cfg() {
    check_pipeline("square_cfg");
}

#[test]
fn nonsquare_cfg_negative() {
    check_pipeline("nonsquare_cfg_negative");
}

#[test]
fn no_t5_square() {
    check_pipeline("no_t5_square");
}

#[test]
fn square_nocfg() {
    check_pipeline("square_nocfg");
}

/// `encode_prompt` of both pipelines against diffusers' for four prompts (one punctuated and
/// mixed-case, one longer than CLIP's 77 tokens, one empty) and a negative prompt.
#[test]
fn prompt_embeddings_match_diffusers() {
    #[derive(serde::Deserialize)]
    struct Text {
        prompts: Vec<String>,
        negative_prompt: String,
        max_sequence_length: usize,
    }
    let text: Text =
        serde_json::from_str(&std::fs::read_to_string(sd3_dir().join("text.json")).unwrap())
            .unwrap();
    let golden = load_goldens(&sd3_dir().join("text.safetensors")).unwrap();
    for model in ["tiny-sd3", "tiny-sd3-no-t5"] {
        let engine = EngineConfig::new("unused");
        let pipeline = StableDiffusion3Pipeline::load(&sd3_dir().join(model), &engine).unwrap();
        let negatives = vec![text.negative_prompt.clone(); text.prompts.len()];
        for (side, prompts) in [("", &text.prompts), ("negative_", &negatives)] {
            let embeds = pipeline
                .encode_prompt(prompts, 1, text.max_sequence_length)
                .unwrap();
            for (name, ours) in [
                ("prompt_embeds", &embeds.prompt_embeds),
                ("pooled_prompt_embeds", &embeds.pooled_prompt_embeds),
            ] {
                let key = format!("{model}.{side}{name}");
                let err = rel_l2(ours, &golden[&key]).unwrap();
                println!("{key}: rel L2 {err:.3e}");
                assert!(err <= 1e-5, "{key}: rel L2 {err:.3e} > 1e-5");
            }
        }
    }
}

/// A copy of a fixture pipeline in the temp dir, removed on drop.
struct TempModel {
    dir: PathBuf,
}

impl TempModel {
    fn copy_of(model: &str, tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("xfuser-sd3-{tag}-{}-{model}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&sd3_dir().join(model), &dir).unwrap();
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
fn a_missing_merges_file_is_named() {
    let model = TempModel::copy_of("tiny-sd3", "merges");
    std::fs::remove_file(model.dir.join("tokenizer_2/merges.txt")).unwrap();
    let err = load_error(&model.dir, ParallelConfig::default());
    assert!(
        err.contains("tokenizer_2") && err.contains("merges.txt"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_pad_token_outside_the_vocabulary_is_named() {
    let model = TempModel::copy_of("tiny-sd3", "pad");
    let file = model.dir.join("tokenizer_2/tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    config["pad_token"] = serde_json::Value::String("<|no such token|>".into());
    std::fs::write(&file, config.to_string()).unwrap();
    let special = model.dir.join("tokenizer_2/special_tokens_map.json");
    if special.exists() {
        let mut map: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&special).unwrap()).unwrap();
        map["pad_token"] = serde_json::Value::String("<|no such token|>".into());
        std::fs::write(&special, map.to_string()).unwrap();
    }
    let err = load_error(&model.dir, ParallelConfig::default());
    assert!(
        err.contains("tokenizer_2") && err.contains("<|no such token|>"),
        "{err}"
    );
}

#[test]
fn ulysses_degrees_that_do_not_divide_the_heads_are_refused_before_loading() {
    // The tiny transformer has 4 heads.
    let err = load_error(
        &sd3_dir().join("tiny-sd3"),
        ParallelConfig {
            ulysses_degree: 3,
            ..Default::default()
        },
    );
    assert!(
        err.contains("--ulysses-degree 3 does not divide the 4 attention heads"),
        "{err}"
    );
}

#[test]
fn an_sd3_transformer_in_a_pixart_folder_is_refused() {
    let model = TempModel::copy_of("tiny-sd3", "pixart");
    let file = model.dir.join("model_index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    index["_class_name"] = serde_json::Value::String("PixArtAlphaPipeline".into());
    index["tokenizer"] = serde_json::json!(["transformers", "T5Tokenizer"]);
    index["text_encoder"] = serde_json::json!(["transformers", "T5EncoderModel"]);
    std::fs::write(&file, index.to_string()).unwrap();
    // The T5 parts of the SD3 folder, where PixArt looks for them.
    for (from, to) in [
        ("tokenizer_3", "tokenizer"),
        ("text_encoder_3", "text_encoder"),
    ] {
        std::fs::remove_dir_all(model.dir.join(to)).unwrap();
        copy_dir(&model.dir.join(from), &model.dir.join(to)).unwrap();
    }
    let err = load_error(&model.dir, ParallelConfig::default());
    assert!(
        err.contains("SD3Transformer2DModel") && err.contains("PixArtAlphaPipeline"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn cfg_parallel_without_guidance_says_how_to_turn_it_on() {
    let engine = {
        let mut e = EngineConfig::new(sd3_dir().join("tiny-sd3").to_string_lossy());
        e.parallel.use_cfg_parallel = true;
        e
    };
    let pipeline = xFuserPipeline::from_pretrained(&engine).unwrap();
    let mut request = input(&case("square_nocfg"), OutputType::Latent);
    request.guidance_scale = 1.0;
    let err = pipeline
        .generate(&request, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("raise --guidance-scale above 1 (got 1)"),
        "{err}"
    );
}
