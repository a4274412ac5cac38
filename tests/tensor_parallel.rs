//! Tensor parallelism (`--tensor-parallel-degree`) on the whole PixArt pipeline: the latents of
//! TP 2 alone and combined with CFG, Ulysses, Ring, PipeFusion (warmup ≥ steps) and data
//! parallelism against the serial run of the same seed (rel L2 ≤ 1e-5); the bytes the tp
//! all-reduces move against the cost model of docs/tensor-parallel.md, exactly; a shard's
//! split-layer parameters 1/T of the model's (row-parallel biases whole); and the refusals:
//! a degree that does not divide the heads (before any weights are read; PixArt's and Flux's),
//! Ulysses that does not divide a tp rank's heads, a model registered without tensor
//! parallelism, a shard run without its group.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use xfuser::core::backbone::{names, Backbone, BackboneInputs, Conditioning, ForwardContext};
use xfuser::core::distributed::{CommOp, CommStats, TpRank};
use xfuser::core::engine::{EngineConfig, InputConfig, OutputType, ParallelConfig, PipelineOutput};
use xfuser::core::registry::LoadOptions;
use xfuser::core::testing::{copy_dir, fixtures_dir, rel_l2, TempDir};
use xfuser::pipelines::runtime::DiTRuntime;
use xfuser::pipelines::xFuserPipeline;
use xfuser::transformers::pixart_transformer_2d::{Config, PixArtTransformer2DModel};

const STEPS: usize = 4;
const ONE: [&str; 1] = ["a red cat sitting on the moon"];
const TWO: [&str; 2] = [
    "a red cat sitting on the moon",
    "a blue bird over the river",
];

fn model_dir(model: &str) -> PathBuf {
    fixtures_dir().join("pipelines").join(model)
}

fn input(prompts: &[&str]) -> InputConfig {
    InputConfig {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: "dark".into(),
        height: Some(64),
        width: Some(64),
        num_inference_steps: STEPS,
        guidance_scale: 4.5,
        seed: 7,
        output_type: OutputType::Latent,
        max_sequence_length: Some(16),
        use_resolution_binning: false,
        ..Default::default()
    }
}

fn engine(dir: &Path, parallel: ParallelConfig) -> EngineConfig {
    let mut engine = EngineConfig::new(dir.to_string_lossy());
    engine.parallel = parallel;
    engine.runtime.comm_timeout = Duration::from_secs(60);
    engine
}

fn run(model: &str, parallel: ParallelConfig, input: &InputConfig) -> PipelineOutput {
    let pipeline = xFuserPipeline::from_pretrained(&engine(&model_dir(model), parallel))
        .expect("pipeline loads");
    pipeline.generate(input, &mut |_, _| {}).expect("run")
}

fn tp2() -> ParallelConfig {
    ParallelConfig {
        tensor_parallel_degree: 2,
        ..Default::default()
    }
}

fn transformer_config(model: &str) -> Config {
    let file = model_dir(model).join("transformer/config.json");
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// Bytes every tp rank sends per transformer forward under the cost model: PixArt's 3
/// all-reduces (self-attention, cross-attention, feed-forward) of (B, p, D) f32 per block it
/// runs, each ⌊2(T−1)/T · B·p·D·4⌋ (a ring all-reduce).
fn pixart_tp_bytes(t: usize, batch: usize, tokens: usize, dim: usize, blocks: usize) -> u64 {
    let x = (batch * tokens * dim * 4) as u64;
    let t = t as u64;
    3 * blocks as u64 * (2 * (t - 1) * x / t)
}

/// The bytes sent by all-reduces on the tp groups, summed over the ranks; and each rank's.
fn tp_all_reduce_bytes(stats: &CommStats) -> (u64, Vec<u64>) {
    let mut per_rank = std::collections::BTreeMap::<usize, u64>::new();
    for (key, counts) in stats.snapshot() {
        if key.group.starts_with("tp[") && key.op == CommOp::AllReduceSum {
            *per_rank.entry(key.rank).or_default() += counts.bytes_sent;
        }
    }
    (per_rank.values().sum(), per_rank.into_values().collect())
}

/// A tensor-parallel configuration against the serial run: latents within 1e-5, and the tp
/// all-reduce bytes equal to `ranks · STEPS · per_rank_step` (each rank the same).
fn check(model: &str, parallel: ParallelConfig, prompts: &[&str], per_rank_step: u64) {
    let input = input(prompts);
    let serial = run(model, ParallelConfig::default(), &input).latents;
    let ranks = parallel.world_size();
    let out = run(model, parallel.clone(), &input);
    let err = rel_l2(&out.latents, &serial).unwrap();
    let stats = out.comm_stats.expect("a parallel run reports its traffic");
    let (total, per_rank) = tp_all_reduce_bytes(&stats);
    let expected = ranks as u64 * STEPS as u64 * per_rank_step;
    println!(
        "{model} {parallel:?}: latents vs serial rel L2 = {err:.3e}; tp all-reduce bytes \
         {total} (cost model {expected})"
    );
    assert!(err <= 1e-5, "rel L2 vs serial {err:.3e} > 1e-5");
    assert_eq!(
        per_rank.len(),
        ranks,
        "every rank all-reduces on its tp group"
    );
    assert_eq!(total, expected, "tp all-reduce bytes vs the cost model");
    assert!(per_rank.iter().all(|b| *b == per_rank[0]), "{per_rank:?}");
}

// 64×64 px: an 8×8 latent, 16 tokens of patch 2. Serial CFG doubles the batch to 2.

#[test]
fn tp2_alone() {
    let d = transformer_config("tiny-pixart-alpha").inner_dim();
    check(
        "tiny-pixart-alpha",
        tp2(),
        &ONE,
        pixart_tp_bytes(2, 2, 16, d, 2),
    );
}

#[test]
fn tp2_cfg2() {
    let d = transformer_config("tiny-pixart-alpha").inner_dim();
    let parallel = ParallelConfig {
        use_cfg_parallel: true,
        ..tp2()
    };
    // Each CFG rank carries one half of the batch.
    check(
        "tiny-pixart-alpha",
        parallel,
        &ONE,
        pixart_tp_bytes(2, 1, 16, d, 2),
    );
}

#[test]
fn tp2_ulysses2() {
    // Σ's 4 heads: 2 per tp rank, 1 per Ulysses rank inside it.
    let d = transformer_config("tiny-pixart-sigma").inner_dim();
    let parallel = ParallelConfig {
        ulysses_degree: 2,
        ..tp2()
    };
    // Each sp rank's forward carries its 8 of the 16 tokens.
    check(
        "tiny-pixart-sigma",
        parallel,
        &ONE,
        pixart_tp_bytes(2, 2, 8, d, 2),
    );
}

#[test]
fn tp2_ring2() {
    let d = transformer_config("tiny-pixart-alpha").inner_dim();
    let parallel = ParallelConfig {
        ring_degree: 2,
        ..tp2()
    };
    check(
        "tiny-pixart-alpha",
        parallel,
        &ONE,
        pixart_tp_bytes(2, 2, 8, d, 2),
    );
}

#[test]
fn tp2_pipefusion2() {
    let d = transformer_config("tiny-pixart-alpha").inner_dim();
    let parallel = ParallelConfig {
        pipefusion_parallel_degree: 2,
        warmup_steps: STEPS,
        ..tp2()
    };
    // Warmup on every step: each stage runs its one block on the whole image.
    check(
        "tiny-pixart-alpha",
        parallel,
        &ONE,
        pixart_tp_bytes(2, 2, 16, d, 1),
    );
}

#[test]
fn tp2_dp2() {
    let d = transformer_config("tiny-pixart-alpha").inner_dim();
    let parallel = ParallelConfig {
        data_parallel_degree: 2,
        ..tp2()
    };
    // Each dp group denoises one prompt, its batch doubled by CFG.
    check(
        "tiny-pixart-alpha",
        parallel,
        &TWO,
        pixart_tp_bytes(2, 2, 16, d, 2),
    );
}

/// After warmup, PipeFusion's patches attend to the other patches' stale K/V, which each tp
/// rank keeps for its H/T heads: the result must be PipeFusion's without tp (not the serial
/// one, which the staleness moves away from).
#[test]
fn tp2_pipefusion2_stale_patches_equal_pipefusion_alone() {
    let input = input(&ONE);
    let pipefusion = ParallelConfig {
        pipefusion_parallel_degree: 2,
        num_pipeline_patch: Some(2),
        warmup_steps: 1,
        ..Default::default()
    };
    let model = "tiny-pixart-alpha";
    let reference = run(model, pipefusion.clone(), &input).latents;
    let parallel = ParallelConfig {
        tensor_parallel_degree: 2,
        ..pipefusion
    };
    let out = run(model, parallel, &input).latents;
    let serial = run(model, ParallelConfig::default(), &input).latents;
    let err = rel_l2(&out, &reference).unwrap();
    let stale = rel_l2(&reference, &serial).unwrap();
    println!("tp2 x pp2 (warmup 1) vs pp2: rel L2 = {err:.3e} (pp2 vs serial {stale:.3e})");
    assert!(err <= 1e-5, "rel L2 vs PipeFusion alone {err:.3e} > 1e-5");
    assert!(
        stale > 10.0 * err.max(1e-7),
        "the stale steps should show: {stale:.3e}"
    );
}

/// The bytes of one block's split layers (attention self and cross, feed-forward) in a shard
/// of `t`, from the config: column-parallel weights and biases and row-parallel weights 1/T,
/// row-parallel biases (to_out.0 ×2, net.2) whole.
fn split_block_bytes(cfg: &Config, t: usize) -> usize {
    let d = cfg.inner_dim();
    let kv = cfg.cross_attention_dim.unwrap_or(d);
    let attn1 = 3 * (d * d + d) + d * d;
    let attn2 = (d * d + d) + 2 * (kv * d + d) + d * d;
    let ff = (4 * d * d + 4 * d) + 4 * d * d;
    let row_biases = 3 * d;
    ((attn1 + attn2 + ff) / t + row_biases) * 4
}

#[test]
fn a_shard_holds_its_share_of_the_split_layers() {
    let dir = model_dir("tiny-pixart-sigma").join("transformer");
    let cfg = transformer_config("tiny-pixart-sigma");
    let serial = PixArtTransformer2DModel::load(&dir, &LoadOptions::default()).unwrap();
    let serial_split = serial.split_parameter_bytes();
    assert_eq!(
        serial_split,
        (cfg.num_layers * split_block_bytes(&cfg, 1)) as u64
    );
    let serial_total = serial.parameter_bytes().unwrap();
    for t in [2, 4] {
        for index in 0..t {
            let options = LoadOptions {
                tp: TpRank::new(index, t).unwrap(),
                ..Default::default()
            };
            let shard = PixArtTransformer2DModel::load(&dir, &options).unwrap();
            let split = shard.split_parameter_bytes();
            println!("tp {t} shard {index}: split layers {split} of {serial_split} bytes");
            assert_eq!(split, (cfg.num_layers * split_block_bytes(&cfg, t)) as u64);
            // The replicated modules are whole on every shard.
            assert_eq!(
                shard.parameter_bytes().unwrap(),
                serial_total - serial_split + split
            );
            assert_eq!(shard.tp_rank(), options.tp);
        }
    }
}

fn refusal(dir: &Path, parallel: ParallelConfig) -> String {
    match xFuserPipeline::from_pretrained(&engine(dir, parallel.clone())) {
        Ok(_) => panic!("{parallel:?} should be refused"),
        Err(e) => e.to_string(),
    }
}

/// T must give every rank whole heads; the check reads only transformer/config.json, so a
/// broken transformer checkpoint does not change the error.
#[test]
fn a_degree_that_does_not_divide_the_heads_is_refused_before_loading() {
    let tmp = TempDir::new("heads");
    let dir = tmp.join("model");
    copy_dir(&model_dir("tiny-pixart-sigma"), &dir).unwrap();
    std::fs::write(
        dir.join("transformer/diffusion_pytorch_model.safetensors"),
        b"broken",
    )
    .unwrap();
    let parallel = ParallelConfig {
        tensor_parallel_degree: 3,
        ..Default::default()
    };
    let err = refusal(&dir, parallel);
    assert!(
        err.contains("--tensor-parallel-degree 3") && err.contains("4 attention heads"),
        "{err}"
    );
    // The same folder with a degree that fits does reach the (broken) weights.
    let err = refusal(&dir, tp2());
    assert!(err.contains("diffusion_pytorch_model"), "{err}");
}

#[test]
fn ulysses_must_divide_the_heads_of_a_tp_rank() {
    let parallel = ParallelConfig {
        ulysses_degree: 4,
        ..tp2()
    };
    let err = refusal(&model_dir("tiny-pixart-sigma"), parallel);
    assert!(
        err.contains("--ulysses-degree 4")
            && err.contains("2 attention heads each tensor-parallel"),
        "{err}"
    );
}

/// Flux's check is the same: degree 4 does not divide tiny-flux-dev's 2 heads, refused from
/// transformer/config.json before its (broken) weights are read.
#[test]
fn a_degree_that_does_not_divide_flux_heads_is_refused_before_loading() {
    let tmp = TempDir::new("flux-heads");
    let dir = tmp.join("model");
    copy_dir(&fixtures_dir().join("flux/tiny-flux-dev"), &dir).unwrap();
    std::fs::write(
        dir.join("transformer/diffusion_pytorch_model.safetensors"),
        b"broken",
    )
    .unwrap();
    let parallel = ParallelConfig {
        tensor_parallel_degree: 4,
        ..Default::default()
    };
    let err = refusal(&dir, parallel);
    assert!(
        err.contains("--tensor-parallel-degree 4") && err.contains("2 attention heads"),
        "{err}"
    );
    let err = refusal(&dir, tp2());
    assert!(err.contains("diffusion_pytorch_model"), "{err}");
}

/// A registered transformer whose `load` ignores `LoadOptions::tp`, as an out-of-tree model
/// that has not been split would register: this test binary's own, never loaded.
const UNSPLIT: &str = "UnsplitTestTransformer2DModel";

fn unsplit_load(_: &Path, _: &LoadOptions) -> xfuser::core::Result<Box<dyn Backbone>> {
    Err(xfuser::core::Error::invalid(
        "the test's unsplit transformer is never loaded",
    ))
}

fn unsplit_shape(
    _: &serde_json::Value,
    _: &Path,
) -> xfuser::core::Result<xfuser::core::registry::ModelShape> {
    Ok(xfuser::core::registry::ModelShape {
        num_attention_heads: 4,
        num_layers: 2,
    })
}

xfuser::core::inventory::submit! {
    xfuser::core::registry::TransformerEntry {
        class_name: UNSPLIT,
        load: unsplit_load,
        shape: unsplit_shape,
        tensor_parallel: false,
    }
}

/// Every stock model is split now; a model registered without tensor parallelism is refused
/// by name, listing the models that have it, before anything is loaded.
#[test]
fn models_not_split_are_refused_by_name() {
    let tmp = TempDir::new("unsplit");
    std::fs::write(
        tmp.join("config.json"),
        format!(r#"{{"_class_name": "{UNSPLIT}"}}"#),
    )
    .unwrap();
    let err = match DiTRuntime::load(
        tmp.path(),
        "TestPipeline",
        &[UNSPLIT],
        8,
        &engine(tmp.path(), tp2()),
    ) {
        Ok(_) => panic!("an unsplit model should refuse tp 2"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("--tensor-parallel-degree 2")
            && err.contains(&format!("{UNSPLIT} does not support tensor parallelism"))
            && err.contains("PixArtTransformer2DModel")
            && err.contains("SD3Transformer2DModel")
            && err.contains("FluxTransformer2DModel"),
        "{err}"
    );
}

/// A shard computes partial sums: run without its tp group it refuses rather than return them.
#[test]
fn a_shard_refuses_a_forward_without_its_group() {
    let dir = model_dir("tiny-pixart-alpha").join("transformer");
    let cfg = transformer_config("tiny-pixart-alpha");
    let options = LoadOptions {
        tp: TpRank::new(1, 2).unwrap(),
        ..Default::default()
    };
    let shard = PixArtTransformer2DModel::load(&dir, &options).unwrap();
    let dev = Device::Cpu;
    let hidden = Tensor::zeros((1, cfg.in_channels, 8, 8), DType::F32, &dev).unwrap();
    let timestep = Tensor::new(&[500f32], &dev).unwrap();
    let caption = cfg.caption_channels.unwrap();
    let conditioning = Conditioning::new().with(
        names::ENCODER_HIDDEN_STATES,
        Tensor::zeros((1, 4, caption), DType::F32, &dev).unwrap(),
    );
    let inputs = BackboneInputs {
        hidden_states: &hidden,
        timestep: &timestep,
        conditioning: &conditioning,
    };
    let err = shard
        .forward(&inputs, &ForwardContext::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor-parallel shard 1 of 2") && err.contains("--tensor-parallel-degree 2"),
        "{err}"
    );
}
