//! The step caches (First-Block-Cache and TeaCache) through the model-neutral runtime, on
//! PixArt-α (cross-attention), SD3 and Flux (joint attention): threshold 0 is the uncached run;
//! a threshold that skips some steps gives the same decisions and latents serially and under
//! Ulysses, Ring and CFG parallel (the decision is agreed over the sp and cfg groups);
//! PipeFusion refuses both caches.

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

fn flux() -> PathBuf {
    fixtures_dir().join("flux/tiny-flux-dev")
}

const KINDS: [StepCacheKind; 2] = [StepCacheKind::FirstBlock, StepCacheKind::TeaCache];

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

fn run(
    model: &Path,
    parallel: ParallelConfig,
    cache: Option<(StepCacheKind, f64)>,
) -> PipelineOutput {
    let mut engine = EngineConfig::new(model.to_string_lossy());
    engine.parallel = parallel;
    engine.runtime.comm_timeout = Duration::from_secs(120);
    engine.runtime.step_cache = cache.map(|(kind, threshold)| StepCache { kind, threshold });
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
    for model in [alpha(), sd3(), flux()] {
        let plain = run(&model, ParallelConfig::default(), None);
        assert!(plain.cache_stats.is_none());
        for kind in KINDS {
            let cached = run(&model, ParallelConfig::default(), Some((kind, 0.0)));
            assert_eq!(
                cached.cache_stats,
                Some(CacheStats {
                    computed: STEPS,
                    steps: STEPS
                })
            );
            let err = rel_l2(&cached.latents, &plain.latents).unwrap();
            println!(
                "{} {kind:?}: threshold 0 vs uncached rel L2 {err:.3e}",
                model.display()
            );
            assert!(err <= 1e-6, "{} {kind:?}: {err:.3e}", model.display());
        }
    }
}

/// First-Block-Cache computes only the first step, TeaCache the first and the last.
#[test]
fn a_huge_threshold_computes_only_the_steps_that_always_run() {
    for model in [sd3(), flux()] {
        let plain = run(&model, ParallelConfig::default(), None);
        for (kind, always) in [(StepCacheKind::FirstBlock, 1), (StepCacheKind::TeaCache, 2)] {
            let cached = run(&model, ParallelConfig::default(), Some((kind, 1e9)));
            assert_eq!(computed(&cached), always, "{} {kind:?}", model.display());
            let err = rel_l2(&cached.latents, &plain.latents).unwrap();
            assert!(err.is_finite() && err > 0.0, "{kind:?}: {err}");
        }
    }
}

/// The first threshold of a ladder that skips some steps but not all, serially.
fn partial_threshold(model: &Path, kind: StepCacheKind) -> (f64, PipelineOutput) {
    let always = match kind {
        StepCacheKind::FirstBlock => 1,
        StepCacheKind::TeaCache => 2,
    };
    for threshold in [
        0.01, 0.03, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.2, 1.6, 2.0, 3.0, 5.0,
    ] {
        let out = run(model, ParallelConfig::default(), Some((kind, threshold)));
        let k = computed(&out);
        println!(
            "{} {kind:?}: threshold {threshold}: computed {k} of {STEPS}",
            model.display()
        );
        if k > always && k < STEPS {
            return (threshold, out);
        }
    }
    panic!("{kind:?}: no threshold of the ladder skips some but not all steps");
}

#[test]
fn parallel_ranks_take_the_serial_decisions() {
    for model in [alpha(), sd3()] {
        for kind in KINDS {
            let (threshold, serial) = partial_threshold(&model, kind);
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
                let out = run(&model, parallel, Some((kind, threshold)));
                assert_eq!(
                    computed(&out),
                    computed(&serial),
                    "{kind:?} {what}: another skip pattern"
                );
                let err = rel_l2(&out.latents, &serial.latents).unwrap();
                println!(
                    "{} {kind:?}: {what} vs serial, cached: rel L2 {err:.3e}",
                    model.display()
                );
                assert!(err <= 1e-5, "{kind:?} {what}: {err:.3e}");
            }
        }
    }
}

#[test]
fn pipefusion_refuses_the_caches() {
    for kind in KINDS {
        let mut engine = EngineConfig::new(sd3().to_string_lossy());
        engine.parallel.pipefusion_parallel_degree = 2;
        engine.runtime.step_cache = Some(StepCache {
            kind,
            threshold: StepCache::DEFAULT_THRESHOLD,
        });
        let pipeline = xFuserPipeline::from_pretrained(&engine).expect("load");
        let err = pipeline
            .generate(&input(), &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(kind.flag()) && err.contains("--pipefusion-parallel-degree"),
            "{err}"
        );
    }
}

/// Tensor parallelism with a cache on: the tp ranks hold replicated activations, measure the
/// same change and agree on it (their sums are all-reduced too), so TP 2 skips the steps the
/// serial run skips and gives its latents, on Flux (joint attention, single blocks with the
/// fused proj_out) and SD3 with its CFG halves on two ranks.
#[test]
fn tensor_parallel_ranks_take_the_serial_decisions() {
    let tp = |cfg: bool| ParallelConfig {
        tensor_parallel_degree: 2,
        use_cfg_parallel: cfg,
        ..Default::default()
    };
    for (model, parallel, what) in [(flux(), tp(false), "tp 2"), (sd3(), tp(true), "tp 2 + cfg")] {
        for kind in KINDS {
            let (threshold, serial) = partial_threshold(&model, kind);
            let out = run(&model, parallel.clone(), Some((kind, threshold)));
            assert_eq!(
                computed(&out),
                computed(&serial),
                "{kind:?} {what}: another skip pattern"
            );
            let err = rel_l2(&out.latents, &serial.latents).unwrap();
            println!(
                "{} {kind:?}: {what} vs serial, cached (threshold {threshold}, {} of {STEPS} \
                 steps computed): rel L2 {err:.3e}",
                model.display(),
                computed(&out)
            );
            assert!(err <= 1e-5, "{kind:?} {what}: {err:.3e}");
        }
    }
}
