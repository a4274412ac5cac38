//! Every parallel method on the whole Stable Diffusion 3 pipeline (joint attention, a text
//! stream the blocks update), through the model-neutral runtime: the latents of a parallel
//! run (ranks as threads) against the serial run of the same seed, rel L2 ≤ 1e-5, for CFG,
//! Ulysses, Ring, USP, data parallel, PipeFusion with every step a warmup step, and hybrids,
//! including token-row counts the sequence-parallel degree does not divide. PipeFusion with
//! one warmup step is an approximation (stale K/V): its result must not depend on the stage
//! count, and its deviation from serial is printed.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Tensor;
use xfuser::core::engine::{EngineConfig, InputConfig, OutputType, ParallelConfig};
use xfuser::core::testing::{fixtures_dir, rel_l2};
use xfuser::pipelines::xFuserPipeline;

fn model_dir() -> PathBuf {
    fixtures_dir().join("sd3/tiny-sd3")
}

fn input(prompts: &[&str], height: usize, width: usize, guidance: f64) -> InputConfig {
    InputConfig {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: "blurry".into(),
        height: Some(height),
        width: Some(width),
        num_inference_steps: 4,
        guidance_scale: guidance,
        seed: 11,
        output_type: OutputType::Latent,
        max_sequence_length: Some(16),
        ..Default::default()
    }
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
fn cfg_parallel() {
    check_against_serial(
        "cfg",
        degrees(1, true, 1, 1),
        input(&["a red cat"], 64, 96, 4.5),
    );
}

#[test]
fn ulysses() {
    check_against_serial(
        "ulysses 2",
        degrees(1, false, 2, 1),
        input(&["a red cat"], 64, 96, 4.5),
    );
}

#[test]
fn ring() {
    check_against_serial(
        "ring 2",
        degrees(1, false, 1, 2),
        input(&["a red cat"], 64, 96, 4.5),
    );
}

/// 4 token rows over 3 ring ranks: the last rank holds padding only after its one row.
#[test]
fn ring_with_padding() {
    check_against_serial(
        "ring 3, 4 token rows",
        degrees(1, false, 1, 3),
        input(&["a red cat"], 64, 64, 4.5),
    );
}

#[test]
fn usp() {
    check_against_serial(
        "usp 2x2",
        degrees(1, false, 2, 2),
        input(&["a red cat"], 64, 96, 4.5),
    );
}

#[test]
fn data_parallel_and_hybrids() {
    let two = input(&["a red cat", "a blue bird over the river"], 64, 96, 4.5);
    check_against_serial("dp 2", degrees(2, false, 1, 1), two.clone());
    check_against_serial("cfg + ulysses 2", degrees(1, true, 2, 1), two.clone());
    check_against_serial("dp 2 + ring 2", degrees(2, false, 1, 2), two);
}

/// With every step a warmup step, PipeFusion computes exactly the serial result, the text
/// stream travelling with the image tokens from stage to stage.
#[test]
fn pipefusion_all_warmup_is_exact() {
    let request = input(&["a red cat"], 64, 96, 4.5);
    check_against_serial("pp 2, warmup 4", pipefusion(2, 2, 4), request.clone());
    let mut hybrid = pipefusion(2, 2, 4);
    hybrid.use_cfg_parallel = true;
    hybrid.ulysses_degree = 2;
    check_against_serial("pp 2 + cfg + ulysses 2, warmup 4", hybrid, request);
}

/// One warmup step, then patches with stale image K/V and fresh text: the result is the same
/// over 2 and 4 stages (it depends on the patches, not on where the blocks run).
#[test]
fn pipefusion_pipelined_does_not_depend_on_the_stage_count() {
    let request = input(&["a red cat"], 64, 96, 4.5);
    let serial = run(ParallelConfig::default(), &request);
    let two = run(pipefusion(2, 2, 1), &request);
    let four = run(pipefusion(4, 2, 1), &request);
    let between = rel_l2(&four, &two).unwrap();
    let deviation = rel_l2(&two, &serial).unwrap();
    println!(
        "pipefusion warmup 1, 2 patches: 4 vs 2 stages rel L2 {between:.3e}; vs serial \
         {deviation:.3e}"
    );
    assert!(between <= 1e-5, "4 vs 2 stages: rel L2 {between:.3e}");
    assert!(deviation.is_finite());
}

/// Tensor parallelism (half the heads and feed-forward features of every block per rank,
/// the text stream's projections included), alone and with every other method.
#[test]
fn tensor_parallel_alone_and_with_every_method() {
    let two = input(&["a red cat", "a blue bird over the river"], 64, 96, 4.5);
    let tp = |p: ParallelConfig| ParallelConfig {
        tensor_parallel_degree: 2,
        ..p
    };
    check_against_serial("tp 2", tp(degrees(1, false, 1, 1)), two.clone());
    check_against_serial("tp 2 + cfg", tp(degrees(1, true, 1, 1)), two.clone());
    check_against_serial("tp 2 + ulysses 2", tp(degrees(1, false, 2, 1)), two.clone());
    check_against_serial("tp 2 + ring 2", tp(degrees(1, false, 1, 2)), two.clone());
    check_against_serial("tp 2 + dp 2", tp(degrees(2, false, 1, 1)), two.clone());
    check_against_serial("tp 2 + pp 2, warmup 4", tp(pipefusion(2, 2, 4)), two);
}

/// The tp all-reduce bytes of an SD3 run equal docs/tensor-parallel.md's cost model: per
/// block the attention and feed-forward outputs of both streams, (B, p, D) and (B, l, D), the
/// last block only the image stream's, each ⌊2(T−1)/T · bytes⌋ per rank (a ring all-reduce).
#[test]
fn tensor_parallel_bytes_follow_the_cost_model() {
    use xfuser::core::distributed::CommOp;
    let request = input(&["a red cat", "a blue bird over the river"], 64, 96, 4.5);
    let mut engine = EngineConfig::new(model_dir().to_string_lossy());
    engine.parallel = ParallelConfig {
        tensor_parallel_degree: 2,
        ..Default::default()
    };
    engine.runtime.comm_timeout = Duration::from_secs(120);
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("load");
    let out = pipeline.generate(&request, &mut |_, _| {}).expect("run");
    let stats = out.comm_stats.expect("a parallel run reports its traffic");
    let sent: u64 = stats
        .snapshot()
        .into_iter()
        .filter(|(k, _)| k.group.starts_with("tp[") && k.op == CommOp::AllReduceSum)
        .map(|(_, c)| c.bytes_sent)
        .sum();
    // 2 prompts × 2 CFG sides; 24 image tokens (4 × 6 of patch 2), 77 CLIP + 16 T5 text
    // tokens; D = 4 heads × 8; 4 blocks; 4 steps; 2 ranks.
    let (b, p, l, d, blocks, steps, ranks) = (4u64, 24u64, 93u64, 32u64, 4u64, 4u64, 2u64);
    let (image, text) = (b * p * d * 4, b * l * d * 4);
    let per_step = 2 * (blocks - 1) * (image + text) + 2 * image;
    let expected = ranks * steps * per_step;
    println!("sd3 tp 2: tp all-reduce bytes {sent} (cost model {expected})");
    assert_eq!(sent, expected);
}
