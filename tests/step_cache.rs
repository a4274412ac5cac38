//! First-Block-Cache through the model-neutral runtime, on PixArt-α (cross-attention) and SD3
//! (joint attention): threshold 0 is the uncached run; a threshold that skips some steps gives
//! the same decisions and latents serially and under Ulysses, Ring and CFG parallel (the
//! decision is agreed over the sp and cfg groups); PipeFusion refuses the cache.

use std::path::{Path, PathBuf};
use std::time::Duration;

use xfuser::core::engine::{
    CacheStats, EngineConfig, InputConfig, OutputType, ParallelConfig, PipelineOutput, StepCache,
    StepCacheKind,
};
use xfuser::core::testing::{fixtures_dir, rel_l2};
use xfuser::pipelines::xFuserPipeline;

const STEPS: usize = 8;

fn alpha() -> PathBuf {
    fixtures_dir().join("pipelines/tiny-pixart-alpha")
}

fn sd3() -> PathBuf {
    fixtures_dir().join("sd3/tiny-sd3")
}

fn input() -> InputConfig {
    InputConfig {
        prompts: vec!["a red cat on the moon".into()],
        height: Some(64),
        width: Some(96),
        num_inference_steps: STEPS,
        guidance_scale: 4.5,
        seed: 5,
        output_type: OutputType::Latent,
        max_sequence_length: Some(16),
        use_resolution_binning: false,
        ..Default::default()
    }
}

fn run(model: &Path, parallel: ParallelConfig, threshold: Option<f64>) -> PipelineOutput {
    let mut engine = EngineConfig::new(model.to_string_lossy());
    engine.parallel = parallel;
    engine.runtime.comm_timeout = Duration::from_secs(120);
    engine.runtime.step_cache = threshold.map(|threshold| StepCache {
        kind: StepCacheKind::FirstBlock,
        threshold,
    });
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("load");
    pipeline.generate(&input(), &mut |_, _| {}).expect("run")
}

fn computed(output: &PipelineOutput) -> usize {
    let stats = output.cache_stats.expect("cache stats");
    assert_eq!(stats.steps, STEPS);
    stats.computed
}

#[test]
fn threshold_zero_is_the_uncached_run() {
    for model in [alpha(), sd3()] {
        let plain = run(&model, ParallelConfig::default(), None);
        assert!(plain.cache_stats.is_none());
        let cached = run(&model, ParallelConfig::default(), Some(0.0));
        assert_eq!(
            cached.cache_stats,
            Some(CacheStats {
                computed: STEPS,
                steps: STEPS
            })
        );
        let err = rel_l2(&cached.latents, &plain.latents).unwrap();
        println!(
            "{}: threshold 0 vs uncached rel L2 {err:.3e}",
            model.display()
        );
        assert!(err <= 1e-6, "{}: {err:.3e}", model.display());
    }
}

#[test]
fn a_huge_threshold_computes_only_the_first_step() {
    let plain = run(&sd3(), ParallelConfig::default(), None);
    let cached = run(&sd3(), ParallelConfig::default(), Some(1e9));
    assert_eq!(computed(&cached), 1);
    let err = rel_l2(&cached.latents, &plain.latents).unwrap();
    assert!(err.is_finite() && err > 0.0, "{err}");
}

/// The first threshold of a ladder that skips some steps but not all, serially.
fn partial_threshold(model: &Path) -> (f64, PipelineOutput) {
    for threshold in [0.01, 0.03, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9] {
        let out = run(model, ParallelConfig::default(), Some(threshold));
        let k = computed(&out);
        println!(
            "{}: threshold {threshold}: computed {k} of {STEPS}",
            model.display()
        );
        if k > 1 && k < STEPS {
            return (threshold, out);
        }
    }
    panic!("no threshold of the ladder skips some but not all steps");
}

#[test]
fn parallel_ranks_take_the_serial_decisions() {
    for model in [alpha(), sd3()] {
        let (threshold, serial) = partial_threshold(&model);
        let degrees = |cfg: bool, ulysses: usize, ring: usize| ParallelConfig {
            use_cfg_parallel: cfg,
            ulysses_degree: ulysses,
            ring_degree: ring,
            ..Default::default()
        };
        for (what, parallel) in [
            ("ulysses 2", degrees(false, 2, 1)),
            ("ring 2", degrees(false, 1, 2)),
            ("cfg", degrees(true, 1, 1)),
        ] {
            let out = run(&model, parallel, Some(threshold));
            assert_eq!(
                computed(&out),
                computed(&serial),
                "{what}: another skip pattern"
            );
            let err = rel_l2(&out.latents, &serial.latents).unwrap();
            println!(
                "{}: {what} vs serial, cached: rel L2 {err:.3e}",
                model.display()
            );
            assert!(err <= 1e-5, "{what}: {err:.3e}");
        }
    }
}

#[test]
fn pipefusion_refuses_the_cache() {
    let mut engine = EngineConfig::new(sd3().to_string_lossy());
    engine.parallel.pipefusion_parallel_degree = 2;
    engine.runtime.step_cache = Some(StepCache {
        kind: StepCacheKind::FirstBlock,
        threshold: StepCache::DEFAULT_THRESHOLD,
    });
    let pipeline = xFuserPipeline::from_pretrained(&engine).expect("load");
    let err = pipeline
        .generate(&input(), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--use-fbcache") && err.contains("--pipefusion-parallel-degree"),
        "{err}"
    );
}
