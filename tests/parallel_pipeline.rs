//! The exact parallel methods on the whole PixArt pipeline: latents of a parallel run (ranks as
//! threads) against the serial run of the same seed (rel L2 ≤ 1e-5) and against diffusers
//! (≤ 1e-4), for CFG, Ulysses, Ring, USP, data parallel and their hybrids, including token
//! counts the sequence-parallel degree does not divide. Then failures: an injected rank
//! error and invalid degrees.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use xfuser::core::engine::{EngineConfig, InputConfig, OutputType, ParallelConfig};
use xfuser::core::testing::{fixtures_dir, load_goldens, rel_l2};
use xfuser::pipelines::xFuserPipeline;

fn model_dir(model: &str) -> PathBuf {
    fixtures_dir().join("pipelines").join(model)
}

fn input(prompts: &[&str], height: usize, width: usize, guidance: f64) -> InputConfig {
    InputConfig {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: "dark".into(),
        height: Some(height),
        width: Some(width),
        num_inference_steps: 4,
        guidance_scale: guidance,
        seed: 7,
        output_type: OutputType::Latent,
        max_sequence_length: Some(16),
        use_resolution_binning: false,
        ..Default::default()
    }
}

fn run(model: &str, parallel: ParallelConfig, input: &InputConfig) -> xfuser::core::Result<Tensor> {
    let mut engine = EngineConfig::new(model_dir(model).to_string_lossy());
    engine.parallel = parallel;
    engine.runtime.comm_timeout = Duration::from_secs(60);
    let pipeline = xFuserPipeline::from_pretrained(&engine)?;
    Ok(pipeline.generate(input, &mut |_, _| {})?.latents)
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

fn check_against_serial(model: &str, parallel: ParallelConfig, input: InputConfig) {
    let serial = run(model, ParallelConfig::default(), &input).expect("serial run");
    let world = parallel.world_size();
    let parallel_latents = run(model, parallel, &input).expect("parallel run");
    let err = rel_l2(&parallel_latents, &serial).unwrap();
    println!("world {world}: latents vs serial rel L2 = {err:.3e}");
    assert!(err <= 1e-5, "rel L2 vs serial {err:.3e} > 1e-5");
}

/// One line per configuration: name, model, (dp, cfg parallel, ulysses, ring), prompts,
/// height, width.
macro_rules! parallel_matrix {
    ($($name:ident: $model:literal, ($dp:expr, $cfg:expr, $u:expr, $r:expr), $prompts:expr, $h:expr, $w:expr;)*) => {$(
        #[test]
        fn $name() {
            check_against_serial($model, degrees($dp, $cfg, $u, $r), input(&$prompts, $h, $w, 4.5));
        }
    )*};
}

const ONE: [&str; 1] = ["a red cat sitting on the moon"];
const TWO: [&str; 2] = [
    "a red cat sitting on the moon",
    "a blue bird over the river",
];

parallel_matrix! {
    cfg2: "tiny-pixart-alpha", (1, true, 1, 1), ONE, 64, 64;
    ulysses2: "tiny-pixart-alpha", (1, false, 2, 1), ONE, 64, 96;
    ulysses4: "tiny-pixart-sigma", (1, false, 4, 1), ONE, 64, 64;
    ring2: "tiny-pixart-alpha", (1, false, 1, 2), ONE, 64, 64;
    ring4: "tiny-pixart-sigma", (1, false, 1, 4), ONE, 64, 96;
    usp_u2_r2: "tiny-pixart-sigma", (1, false, 2, 2), ONE, 64, 64;
    cfg2_u2_r2_eight_ranks: "tiny-pixart-sigma", (1, true, 2, 2), ONE, 64, 64;
    dp2_two_prompts: "tiny-pixart-alpha", (2, false, 1, 1), TWO, 64, 64;
    dp2_cfg2: "tiny-pixart-alpha", (2, true, 1, 1), TWO, 64, 64;
    // 48 px -> 6 latent rows -> 3 token rows: neither 2 nor 4 divides them.
    ulysses2_padded: "tiny-pixart-alpha", (1, false, 2, 1), ONE, 48, 64;
    ring2_padded: "tiny-pixart-alpha", (1, false, 1, 2), ONE, 48, 64;
    ring4_padded: "tiny-pixart-sigma", (1, false, 1, 4), ONE, 48, 64;
}

/// The hybrid of everything exact, on a diffusers golden case: parallel vs diffusers.
#[test]
fn cfg2_u2_r2_matches_diffusers() {
    let golden =
        load_goldens(&fixtures_dir().join("pipelines/goldens/sigma_nonsquare_cfg.safetensors"))
            .expect("goldens");
    let input = InputConfig {
        prompts: vec!["a painting of a garden at sunset".into()],
        negative_prompt: String::new(),
        height: Some(96),
        width: Some(64),
        num_inference_steps: 10,
        guidance_scale: 4.5,
        seed: 3,
        output_type: OutputType::Latent,
        max_sequence_length: Some(24),
        use_resolution_binning: false,
        ..Default::default()
    };
    let latents = run("tiny-pixart-sigma", degrees(1, true, 2, 2), &input).expect("parallel run");
    let err = rel_l2(&latents, &golden["latents"]).unwrap();
    println!("cfg2 x u2 x r2 vs diffusers: rel L2 = {err:.3e}");
    assert!(err <= 1e-4, "rel L2 vs diffusers {err:.3e} > 1e-4");
}

#[test]
fn dp2_matches_diffusers_batch() {
    let golden =
        load_goldens(&fixtures_dir().join("pipelines/goldens/sigma_square_cfg_batch2.safetensors"))
            .expect("goldens");
    let input = InputConfig {
        prompts: vec![
            "an old house in winter".into(),
            "a dog running, happy!".into(),
        ],
        negative_prompt: "dark".into(),
        height: Some(64),
        width: Some(64),
        num_inference_steps: 10,
        guidance_scale: 3.0,
        seed: 2,
        output_type: OutputType::Latent,
        max_sequence_length: Some(24),
        use_resolution_binning: false,
        ..Default::default()
    };
    let latents = run("tiny-pixart-sigma", degrees(2, true, 1, 1), &input).expect("parallel run");
    let err = rel_l2(&latents, &golden["latents"]).unwrap();
    assert!(
        err <= 1e-4,
        "dp2 x cfg2 vs diffusers rel L2 {err:.3e} > 1e-4"
    );
}

#[test]
fn images_come_back_once_per_prompt() {
    let mut engine = EngineConfig::new(model_dir("tiny-pixart-alpha").to_string_lossy());
    engine.parallel = degrees(2, true, 2, 1);
    let pipeline = xFuserPipeline::from_pretrained(&engine).unwrap();
    let mut request = input(&TWO, 64, 64, 4.5);
    request.output_type = OutputType::Pil;
    request.num_inference_steps = 2;
    let mut steps = Vec::new();
    let out = pipeline
        .generate(&request, &mut |i, n| steps.push((i, n)))
        .unwrap();
    assert_eq!(out.images.len(), 2);
    assert_eq!(out.latents.dims(), [2, 4, 8, 8]);
    // One progress report per step (rank 0's), not one per rank.
    assert_eq!(steps, vec![(1, 2), (2, 2)]);
    let stats = out.comm_stats.expect("parallel runs report their traffic");
    assert!(!stats.snapshot().is_empty());
}

#[test]
fn a_failing_rank_fails_every_rank_quickly() {
    let mut engine = EngineConfig::new(model_dir("tiny-pixart-sigma").to_string_lossy());
    engine.parallel = degrees(1, true, 2, 1);
    engine.runtime.comm_timeout = Duration::from_secs(20);
    engine.runtime.inject_failure = Some((3, 2));
    let pipeline = xFuserPipeline::from_pretrained(&engine).unwrap();
    let started = Instant::now();
    let err = pipeline
        .generate(&input(&ONE, 64, 64, 4.5), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    let elapsed = started.elapsed();
    assert!(err.contains("injected failure on rank 3"), "{err}");
    // Peers are woken by the abort, not by the timeout.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn invalid_degrees_are_refused_before_any_work() {
    let check = |model: &str, parallel: ParallelConfig, guidance: f64, want: &str| {
        let mut engine = EngineConfig::new(model_dir(model).to_string_lossy());
        engine.parallel = parallel;
        let pipeline = xFuserPipeline::from_pretrained(&engine).unwrap();
        let mut steps = 0;
        let err = pipeline
            .generate(&input(&ONE, 64, 64, guidance), &mut |_, _| steps += 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "expected {want:?} in: {err}");
        assert_eq!(steps, 0, "no step may run before the refusal");
    };
    // 3 does not divide the 2 heads of the α fixture: refused when loading, from the
    // transformer's config alone, before any weights are read.
    let mut engine = EngineConfig::new(model_dir("tiny-pixart-alpha").to_string_lossy());
    engine.parallel = degrees(1, false, 3, 1);
    let err = match xFuserPipeline::from_pretrained(&engine) {
        Ok(_) => panic!("--ulysses-degree 3 on 2 heads was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("does not divide the 2 attention heads"),
        "{err}"
    );
    check(
        "tiny-pixart-alpha",
        degrees(1, true, 1, 1),
        1.0,
        "CFG parallel needs classifier-free guidance",
    );
    check(
        "tiny-pixart-alpha",
        degrees(2, false, 1, 1),
        4.5,
        "needs at least 2 images",
    );
}
