//! Every parallel method on the whole Flux.1 pipeline (double blocks with joint attention,
//! single blocks keeping text and image apart, RoPE per rank's rows, embedded guidance),
//! through the model-neutral runtime: the latents of a parallel run (ranks as threads) against
//! the serial run of the same seed, rel L2 ≤ 1e-5, for Ulysses, Ring, USP, data parallel, CFG
//! parallel with true CFG, PipeFusion with every step a warmup step. PipeFusion with one
//! warmup step is an approximation (stale K/V): its result must not depend on the stage count
//! (2 and 4 stages over the 2 double + 2 single blocks), and its deviation from serial is
//! printed. Tensor parallelism: TP 2 alone and with Ulysses, Ring, data parallel, CFG parallel
//! (true CFG) and PipeFusion (warmup ≥ steps) against the serial run, and its all-reduce bytes
//! against the cost model of docs/tensor-parallel.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Tensor;
use xfuser::core::engine::{EngineConfig, InputConfig, OutputType, ParallelConfig, PipelineOutput};
use xfuser::core::testing::{copy_dir, fixtures_dir, rel_l2, TempDir};
use xfuser::pipelines::xFuserPipeline;

fn model_dir() -> PathBuf {
    fixtures_dir().join("flux/tiny-flux-dev")
}

/// tiny-flux-dev with the 4-head transformer of the backbone fixtures
/// (tests/fixtures/flux/transformer/dev: the same widths, text and latent channels, twice the
/// heads), so that TP 2 leaves each rank 2 heads to split over 2 Ulysses ranks. In `tmp`.
fn four_head_model_dir(tmp: &TempDir) -> PathBuf {
    let dir = tmp.join("tiny-flux-dev-4-heads");
    copy_dir(&model_dir(), &dir).unwrap();
    let transformer = dir.join("transformer");
    std::fs::remove_dir_all(&transformer).unwrap();
    copy_dir(&fixtures_dir().join("flux/transformer/dev"), &transformer).unwrap();
    dir
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
    run_in(&model_dir(), parallel, input).latents
}

fn run_in(dir: &Path, parallel: ParallelConfig, input: &InputConfig) -> PipelineOutput {
    let mut engine = EngineConfig::new(dir.to_string_lossy());
    engine.parallel = parallel;
    engine.runtime.comm_timeout = Duration::from_secs(120);
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("load");
    pipeline.generate(input, &mut |_, _| {}).expect("run")
}

fn check_against_serial(what: &str, parallel: ParallelConfig, input: InputConfig) {
    check_against_serial_in(&model_dir(), what, parallel, input);
}

fn check_against_serial_in(dir: &Path, what: &str, parallel: ParallelConfig, input: InputConfig) {
    let serial = run_in(dir, ParallelConfig::default(), &input).latents;
    let latents = run_in(dir, parallel, &input).latents;
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

/// Tensor parallelism (half the heads of every double and single block, both streams'
/// projections, half the MLP features, proj_out cut per [attention, mlp] segment), alone and
/// with every other method. Flux is guidance-distilled: CFG parallelism runs with true CFG.
#[test]
fn tensor_parallel_alone_and_with_every_method() {
    let one = input(&["a red cat"], 64, 96);
    let tp = |p: ParallelConfig| ParallelConfig {
        tensor_parallel_degree: 2,
        ..p
    };
    // tiny-flux-dev's 2 heads: one per tp rank.
    check_against_serial("tp 2, 2 heads", tp(degrees(1, false, 1, 1)), one.clone());
    let tmp = TempDir::new("flux-tp");
    let dir = four_head_model_dir(&tmp);
    let check = |what: &str, parallel, input| check_against_serial_in(&dir, what, parallel, input);
    let two = input(&["a red cat", "a blue bird over the river"], 64, 96);
    check("tp 2", tp(degrees(1, false, 1, 1)), one.clone());
    check("tp 2 + ulysses 2", tp(degrees(1, false, 2, 1)), one.clone());
    check("tp 2 + ring 2", tp(degrees(1, false, 1, 2)), one.clone());
    check("tp 2 + dp 2", tp(degrees(2, false, 1, 1)), two);
    check(
        "tp 2 + cfg (true cfg)",
        tp(degrees(1, true, 1, 1)),
        true_cfg(one.clone()),
    );
    check("tp 2 + pp 2, warmup 4", tp(pipefusion(2, 2, 4)), one);
}

/// The tp all-reduce bytes of a Flux run equal docs/tensor-parallel.md's cost model: per
/// double block two of (B, p+l, D) (the attention outputs of both streams together, then
/// their feed-forwards'), per single block one (proj_out of both streams), each
/// ⌊2(T−1)/T · bytes⌋ per rank (a ring all-reduce).
#[test]
fn tensor_parallel_bytes_follow_the_cost_model() {
    use xfuser::core::distributed::CommOp;
    let request = input(&["a red cat"], 64, 96);
    let out = run_in(
        &model_dir(),
        ParallelConfig {
            tensor_parallel_degree: 2,
            ..Default::default()
        },
        &request,
    );
    let stats = out.comm_stats.expect("a parallel run reports its traffic");
    let sent: u64 = stats
        .snapshot()
        .into_iter()
        .filter(|(k, _)| k.group.starts_with("tp[") && k.op == CommOp::AllReduceSum)
        .map(|(_, c)| c.bytes_sent)
        .sum();
    // 1 prompt, no CFG; 24 image tokens (an 8 × 12 latent packed 2 × 2), 16 T5 tokens; D = 2
    // heads × 8; 2 double and 2 single blocks; 4 steps; 2 ranks.
    let (b, p, l, d, double, single, steps, ranks) =
        (1u64, 24u64, 16u64, 16u64, 2u64, 2u64, 4u64, 2u64);
    let t = 2u64;
    let per_forward = 2 * (t - 1) * (b * (p + l) * d * 4) / t * (2 * double + single);
    let expected = ranks * steps * per_forward;
    println!("flux tp 2: tp all-reduce bytes {sent} (cost model {expected})");
    assert_eq!(sent, expected);
}
