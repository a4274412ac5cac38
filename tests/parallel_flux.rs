//! Every parallel method on the whole Flux.1 pipeline (double blocks with joint attention,
//! single blocks keeping text and image apart, RoPE per rank's rows, embedded guidance),
//! through the model-neutral runtime: the latents of a parallel run (ranks as threads) against
//! the serial run of the same seed, rel L2 ≤ 1e-5, for Ulysses, Ring, USP, data parallel, CFG
//! parallel with true CFG, PipeFusion with every step a warmup step. PipeFusion with one
//! warmup step is an approximation (stale K/V): its result must not depend on the stage count
//! (2 and 4 stages over the 2 double + 2 single blocks), and its deviation from serial is
//! printed.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Tensor;
use xfuser::core::engine::{EngineConfig, InputConfig, OutputType, ParallelConfig};
use xfuser::core::testing::{fixtures_dir, rel_l2};
use xfuser::pipelines::xFuserPipeline;

fn model_dir() -> PathBuf {
    fixtures_dir().join("flux/tiny-flux-dev")
}

fn input(prompts: &[&str], height: usize, width: usize) -> InputConfig {
    InputConfig {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        height: Some(height),
        width: Some(width),
        num_inference_steps: 4,
        guidance_scale: 3.5,
        seed: 11,
        output_type: OutputType::Latent,
        max_sequence_length: Some(16),
        ..Default::default()
    }
}

/// `input` with diffusers' true CFG: a negative prompt at scale 4.
fn true_cfg(mut input: InputConfig) -> InputConfig {
    input.negative_prompt = "blurry".into();
    input.true_cfg_scale = 4.0;
    input
}

fn run(parallel: ParallelConfig, input: &InputConfig) -> Tensor {
    let mut engine = EngineConfig::new(model_dir().to_string_lossy());
    engine.parallel = parallel;
    engine.runtime.comm_timeout = Duration::from_secs(120);
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("load");
    pipeline
        .generate(input, &mut |_, _| {})
        .expect("run")
        .latents
}

fn check_against_serial(what: &str, parallel: ParallelConfig, input: InputConfig) {
    let serial = run(ParallelConfig::default(), &input);
    let latents = run(parallel, &input);
    let err = rel_l2(&latents, &serial).unwrap();
    println!("{what}: latents vs serial rel L2 = {err:.3e}");
    assert!(err <= 1e-5, "{what}: rel L2 vs serial {err:.3e} > 1e-5");
}

fn degrees(dp: usize, cfg: bool, ulysses: usize, ring: usize) -> ParallelConfig {
    ParallelConfig {
        data_parallel_degree: dp,
        use_cfg_parallel: cfg,
        ulysses_degree: ulysses,
        ring_degree: ring,
        ..Default::default()
    }
}

fn pipefusion(pp: usize, patches: usize, warmup: usize) -> ParallelConfig {
    ParallelConfig {
        pipefusion_parallel_degree: pp,
        num_pipeline_patch: Some(patches),
        warmup_steps: warmup,
        ..Default::default()
    }
}

#[test]
fn ulysses() {
    check_against_serial(
        "ulysses 2",
        degrees(1, false, 2, 1),
        input(&["a red cat"], 64, 96),
    );
}

#[test]
fn ring() {
    check_against_serial(
        "ring 2",
        degrees(1, false, 1, 2),
        input(&["a red cat"], 64, 96),
    );
}

/// 3 token rows over 2 ring ranks: the second rank holds one row and padding.
/// 4 token rows over 4 ring ranks: one row each.
#[test]
fn ring_4() {
    check_against_serial(
        "ring 4",
        degrees(1, false, 1, 4),
        input(&["a red cat"], 64, 96),
    );
}

#[test]
fn ring_with_padding() {
    check_against_serial(
        "ring 2, 3 token rows",
        degrees(1, false, 1, 2),
        input(&["a red cat"], 48, 64),
    );
}

#[test]
fn usp() {
    check_against_serial(
        "usp 2x2",
        degrees(1, false, 2, 2),
        input(&["a red cat"], 64, 96),
    );
}

#[test]
fn data_parallel() {
    check_against_serial(
        "dp 2",
        degrees(2, false, 1, 1),
        input(&["a red cat", "a blue bird over the river"], 64, 96),
    );
}

#[test]
fn cfg_parallel_with_true_cfg() {
    let request = true_cfg(input(&["a red cat"], 64, 96));
    check_against_serial(
        "true cfg, cfg parallel",
        degrees(1, true, 1, 1),
        request.clone(),
    );
    check_against_serial("true cfg, cfg + ulysses 2", degrees(1, true, 2, 1), request);
}

/// With every step a warmup step, PipeFusion computes exactly the serial result, the text
/// stream travelling with the image tokens from stage to stage (and across the boundary
/// between double and single blocks).
#[test]
fn pipefusion_all_warmup_is_exact() {
    let request = input(&["a red cat"], 64, 96);
    check_against_serial("pp 2, warmup 4", pipefusion(2, 2, 4), request.clone());
    check_against_serial("pp 4, warmup 4", pipefusion(4, 2, 4), request);
}

/// One warmup step, then patches with stale image K/V and fresh text: the result is the same
/// over 2 and 4 stages (it depends on the patches, not on where the blocks run).
#[test]
fn pipefusion_pipelined_does_not_depend_on_the_stage_count() {
    let request = input(&["a red cat"], 64, 96);
    let serial = run(ParallelConfig::default(), &request);
    let two = run(pipefusion(2, 2, 1), &request);
    let four = run(pipefusion(4, 2, 1), &request);
    let between = rel_l2(&four, &two).unwrap();
    let deviation = rel_l2(&two, &serial).unwrap();
    println!(
        "flux pipefusion warmup 1, 2 patches: 4 vs 2 stages rel L2 {between:.3e}; vs serial \
         {deviation:.3e}"
    );
    assert!(between <= 1e-5, "4 vs 2 stages: rel L2 {between:.3e}");
    assert!(deviation.is_finite());
}

/// `--use-cfg-parallel` without true CFG is refused, saying why.
#[test]
fn cfg_parallel_without_true_cfg_is_refused() {
    let mut engine = EngineConfig::new(model_dir().to_string_lossy());
    engine.parallel = degrees(1, true, 1, 1);
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("load");
    let err = pipeline
        .generate(&input(&["a red cat"], 64, 64), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Flux uses guidance embedding, not classifier-free guidance"),
        "{err}"
    );
}
