//! DiT against diffusers, through the library: one transformer forward (learned sigma, a class
//! and the null class in one batch), and the golden pipeline runs (final latents ≤ 1e-4 rel
//! L2, images ≤ 2/255) of both tiny models, with and without guidance. The fixtures come from
//! scripts/fixtures/dit.py (pinned diffusers); nothing here runs Python.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xfuser_core::backbone::{names, Backbone, BackboneInputs, Conditioning, ForwardContext};
use xfuser_core::engine::{EngineConfig, InputConfig, OutputType};
use xfuser_core::registry::{load_pipeline, LoadOptions};
use xfuser_core::testing::{images_max_abs_diff, load_goldens, max_abs_diff, read_case, rel_l2};
use xfuser_dit_plugin::{DiTPipeline, DiTTransformer2DModel};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    labels: Vec<String>,
    height: usize,
    width: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
    seed: u64,
}

#[test]
fn transformer_forward_matches_diffusers() {
    let g = load_goldens(&fixtures().join("transformer.safetensors")).unwrap();
    let model = DiTTransformer2DModel::load(
        &fixtures().join("tiny-dit/transformer"),
        &LoadOptions::default(),
    )
    .unwrap();
    let conditioning = Conditioning::new().with(names::CLASS_LABELS, g["class_labels"].clone());
    let timestep = g["timestep"].to_dtype(DType::F32).unwrap();
    let inputs = BackboneInputs {
        hidden_states: &g["hidden_states"],
        timestep: &timestep,
        conditioning: &conditioning,
    };
    let ours = model.forward(&inputs, &ForwardContext::default()).unwrap();
    let (err, worst) = (
        rel_l2(&ours, &g["sample"]).unwrap(),
        max_abs_diff(&ours, &g["sample"]).unwrap(),
    );
    println!("transformer forward: rel L2 {err:.3e}, max abs {worst:.3e}");
    assert_eq!(ours.dims(), &[2, 8, 8, 8]);
    assert!(err <= 1e-5, "transformer forward rel L2 {err:.3e} > 1e-5");
}

/// Tensor parallelism at degree 2: each rank loads its shard (one of the two heads of every
/// attention, half the feed-forward features), and the all-reduced forward equals diffusers'
/// on both ranks.
#[test]
fn tp2_shards_forward_like_diffusers() {
    use xfuser_core::distributed::{launch_local, LaunchOptions, RankMesh, TpRank};
    use xfuser_core::engine::ParallelConfig;
    let g = load_goldens(&fixtures().join("transformer.safetensors")).unwrap();
    let dir = fixtures().join("tiny-dit/transformer");
    let serial = DiTTransformer2DModel::load(&dir, &LoadOptions::default()).unwrap();
    let shards: Vec<_> = (0..2)
        .map(|i| {
            let options = LoadOptions {
                tp: TpRank::new(i, 2).unwrap(),
                ..Default::default()
            };
            DiTTransformer2DModel::load(&dir, &options).unwrap()
        })
        .collect();
    // Split layers: half of each, the row-parallel biases (to_out.0, ff.net.2) whole.
    let row_biases = 2 * 2 * 16 * 4;
    for shard in &shards {
        assert_eq!(
            shard.split_parameter_bytes(),
            (serial.split_parameter_bytes() - row_biases) / 2 + row_biases
        );
    }
    let conditioning = Conditioning::new().with(names::CLASS_LABELS, g["class_labels"].clone());
    let timestep = g["timestep"].to_dtype(DType::F32).unwrap();
    let inputs = BackboneInputs {
        hidden_states: &g["hidden_states"],
        timestep: &timestep,
        conditioning: &conditioning,
    };
    let mesh = RankMesh::new(&ParallelConfig {
        tensor_parallel_degree: 2,
        ..Default::default()
    })
    .unwrap();
    let outs = launch_local(&mesh, &LaunchOptions::default(), |rank| {
        let ctx = ForwardContext::default().with_tp(Some(rank.tp_group().clone()));
        shards[rank.coords().tp].forward(&inputs, &ctx)
    })
    .unwrap();
    for (r, out) in outs.iter().enumerate() {
        let err = rel_l2(out, &g["sample"]).unwrap();
        println!("transformer forward, tp 2 rank {r}: rel L2 {err:.3e} vs diffusers");
        assert!(err <= 1e-5, "tp rank {r}: rel L2 {err:.3e} > 1e-5");
    }
    // A shard computes partial sums: without its group it refuses.
    let err = shards[1]
        .forward(&inputs, &ForwardContext::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor-parallel shard 1 of 2"), "{err}");
}

#[test]
fn a_label_outside_the_table_is_refused() {
    let model = DiTTransformer2DModel::load(
        &fixtures().join("tiny-dit/transformer"),
        &LoadOptions::default(),
    )
    .unwrap();
    let latents = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let timestep = Tensor::new(&[10f32], &Device::Cpu).unwrap();
    for (labels, needle) in [(Some(1001u32), "class label 1001"), (None, "class_labels")] {
        let mut conditioning = Conditioning::new();
        if let Some(l) = labels {
            conditioning.insert(
                names::CLASS_LABELS,
                Tensor::new(&[l], &Device::Cpu).unwrap(),
            );
        }
        let inputs = BackboneInputs {
            hidden_states: &latents,
            timestep: &timestep,
            conditioning: &conditioning,
        };
        let err = model
            .forward(&inputs, &ForwardContext::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
}

/// The golden case `name` through the registry (as the CLI loads it): latents and images.
fn check_case(name: &str) {
    xfuser_dit_plugin::link();
    let case: Case = read_case(&fixtures().join("goldens/cases.json"), name).unwrap();
    let g = load_goldens(&fixtures().join(format!("goldens/{name}.safetensors"))).unwrap();
    let dir = fixtures().join(&case.model);
    let engine = EngineConfig::new(dir.to_string_lossy());
    let pipeline = load_pipeline(&dir, &engine).unwrap();
    assert_eq!(pipeline.class_name(), "DiTPipeline");
    let input = InputConfig {
        prompts: case.labels.clone(),
        height: Some(case.height),
        width: Some(case.width),
        num_inference_steps: case.num_inference_steps,
        guidance_scale: case.guidance_scale,
        seed: case.seed,
        output_type: OutputType::Pil,
        ..Default::default()
    };
    let out = pipeline.generate(&input, &mut |_, _| {}).unwrap();
    let (err, worst) = (
        rel_l2(&out.latents, &g["latents"]).unwrap(),
        max_abs_diff(&out.latents, &g["latents"]).unwrap(),
    );
    let image = images_max_abs_diff(&out.images, &g["image"]).unwrap();
    println!(
        "{name}: latents rel L2 {err:.3e}, max abs {worst:.3e}; image max diff {:.2}/255",
        image * 255.0
    );
    assert!(err <= 1e-4, "{name}: latents rel L2 {err:.3e} > 1e-4");
    assert!(
        image <= 2.0 / 255.0,
        "{name}: image differs by {:.2}/255",
        image * 255.0
    );
}

#[test]
fn small_cfg() {
    check_case("small_cfg");
}

#[test]
fn small_nocfg_batch2() {
    check_case("small_nocfg_batch2");
}

#[test]
fn medium_cfg_batch2() {
    check_case("medium_cfg_batch2");
}

#[test]
fn medium_nocfg() {
    check_case("medium_nocfg");
}

#[test]
fn labels_come_from_id2label() {
    let dir = fixtures().join("tiny-dit");
    let pipeline = DiTPipeline::load(&dir, &EngineConfig::new(dir.to_string_lossy())).unwrap();
    let ids = pipeline
        .get_label_ids(&[
            "tench".into(),
            "Carcharodon carcharias".into(),
            "ostrich".into(),
        ])
        .unwrap();
    assert_eq!(ids, vec![0, 2, 9]);
    assert_eq!(pipeline.labels().len(), 22);
}

/// facebook/DiT-XL-2-256 names its transformer `Transformer2DModel` (with keys only that old
/// class reads): the alias registered for `norm_type: "ada_norm_zero"` loads it as DiT, with
/// the same result.
#[test]
fn the_old_transformer_class_name_loads_as_dit() {
    xfuser_dit_plugin::link();
    let tmp = std::env::temp_dir().join(format!("xfuser-dit-alias-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    xfuser_core::testing::copy_dir(&fixtures().join("tiny-dit"), &tmp).unwrap();
    let file = tmp.join("transformer/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    config["_class_name"] = "Transformer2DModel".into();
    config["cross_attention_dim"] = serde_json::Value::Null;
    config["use_linear_projection"] = false.into();
    std::fs::write(&file, config.to_string()).unwrap();
    let input = InputConfig {
        prompts: vec!["hen".into()],
        num_inference_steps: 2,
        guidance_scale: 2.0,
        output_type: OutputType::Latent,
        ..Default::default()
    };
    let run = |dir: &Path| {
        let engine = EngineConfig::new(dir.to_string_lossy());
        let pipeline = load_pipeline(dir, &engine).unwrap();
        pipeline.generate(&input, &mut |_, _| {}).unwrap().latents
    };
    let (renamed, original) = (run(&tmp), run(&fixtures().join("tiny-dit")));
    let _ = std::fs::remove_dir_all(&tmp);
    assert_eq!(max_abs_diff(&renamed, &original).unwrap(), 0.0);
}

/// The runtime's step caches run on the plugin's model too: at threshold 0 both give the
/// uncached latents, and a huge threshold skips what each may skip (First-Block-Cache all but
/// the first step's blocks after the first, TeaCache all but the first and last steps).
#[test]
fn the_runtime_step_caches_run_on_dit() {
    use xfuser_core::engine::{StepCache, StepCacheKind};
    let dir = fixtures().join("tiny-dit");
    let input = InputConfig {
        prompts: vec!["goldfish".into()],
        num_inference_steps: 5,
        guidance_scale: 4.0,
        seed: 3,
        output_type: OutputType::Latent,
        ..Default::default()
    };
    let run = |cache: Option<StepCache>| {
        let mut engine = EngineConfig::new(dir.to_string_lossy());
        engine.runtime.step_cache = cache;
        let pipeline = load_pipeline(&dir, &engine).unwrap();
        pipeline.generate(&input, &mut |_, _| {}).unwrap()
    };
    let plain = run(None).latents;
    for (kind, always) in [(StepCacheKind::FirstBlock, 1), (StepCacheKind::TeaCache, 2)] {
        let exact = run(Some(StepCache {
            kind,
            threshold: 0.0,
        }));
        let err = rel_l2(&exact.latents, &plain).unwrap();
        println!("{kind:?}: threshold 0 vs uncached rel L2 {err:.3e}");
        assert!(err <= 1e-6, "{kind:?}: {err:.3e}");
        let skipping = run(Some(StepCache {
            kind,
            threshold: 1e9,
        }));
        let stats = skipping.cache_stats.unwrap();
        assert_eq!((stats.computed, stats.steps), (always, 5), "{kind:?}");
    }
}

/// The tp all-reduce bytes of a DiT run equal docs/tensor-parallel.md's cost model: per block
/// two all-reduces of (B, p, D) (attention, feed-forward), each ⌊2(T−1)/T · bytes⌋ per rank.
#[test]
fn tensor_parallel_bytes_follow_the_cost_model() {
    use xfuser_core::distributed::CommOp;
    use xfuser_core::engine::ParallelConfig;
    xfuser_dit_plugin::link();
    let dir = fixtures().join("tiny-dit");
    let mut engine = EngineConfig::new(dir.to_string_lossy());
    engine.parallel = ParallelConfig {
        tensor_parallel_degree: 2,
        ..Default::default()
    };
    let pipeline = load_pipeline(&dir, &engine).unwrap();
    let steps = 3u64;
    let input = InputConfig {
        prompts: vec!["goldfish".into()],
        num_inference_steps: steps as usize,
        guidance_scale: 4.0,
        seed: 3,
        output_type: OutputType::Latent,
        ..Default::default()
    };
    let out = pipeline.generate(&input, &mut |_, _| {}).unwrap();
    let stats = out.comm_stats.expect("a parallel run reports its traffic");
    let sent: u64 = stats
        .snapshot()
        .into_iter()
        .filter(|(k, _)| k.group.starts_with("tp[") && k.op == CommOp::AllReduceSum)
        .map(|(_, c)| c.bytes_sent)
        .sum();
    // One label, its batch doubled by CFG; a 64 px image: an 8 × 8 latent, 16 tokens of patch
    // 2; D = 2 heads × 8; 2 blocks; 2 ranks.
    let (b, p, d, blocks, t) = (2u64, 16u64, 16u64, 2u64, 2u64);
    let per_forward = 2 * blocks * (2 * (t - 1) * (b * p * d * 4) / t);
    let expected = t * steps * per_forward;
    println!("dit tp 2: tp all-reduce bytes {sent} (cost model {expected})");
    assert_eq!(sent, expected);
}
