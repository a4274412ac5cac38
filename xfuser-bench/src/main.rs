//! CPU benchmarks of xfuser-rs against diffusers/PyTorch (`scripts/bench_pytorch.py` does the
//! same work in torch; `scripts/bench_compare.py` runs both in turn and prints the ratio).
//!
//! - `pixart-forward`: one full-size PixArt-α transformer forward (random weights drawn here);
//! - `sd3-forward`: one SD3 transformer (MMDiT) forward at SD3-medium width (module `sd3`);
//! - `flux-forward`: one Flux.1-dev transformer forward at full Flux width, few blocks
//!   (module `flux`);
//! - `pipeline`: the denoising loop with classifier-free guidance (transformer + DPM-Solver++);
//! - `gemm-floor`: candle's sgemm rate on the forward's matrix products and the time they need;
//! - `parallel`: the loop on `--world` rank threads with CFG, Ulysses, Ring, PipeFusion or
//!   tensor parallelism; built with `--features mpi` and started by `mpirun -n <world>`, on one
//!   process per rank instead (only rank 0 prints).
//! - `vae`: the full-size PixArt VAE decode, serial vs patch-parallel (module `vae`).
//!
//! Every timed subcommand prints `rust_seconds=<median>` and `gflops=<achieved>` as its last
//! lines.

mod flux;
mod sd3;
mod vae;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use clap::{Args, Parser, Subcommand, ValueEnum};
use xfuser_core::backbone::PipelineStage;
use xfuser_core::backbone::{
    names, Backbone, BackboneInputs, Conditioning, ForwardContext, SpContext,
};
use xfuser_core::distributed::runtime_state::input_metadata;
use xfuser_core::distributed::{
    launch_local, process_world, CommStats, LaunchOptions, RankContext, RankMesh, RankThreads,
    ShapeParams, TpRank,
};
use xfuser_core::engine::{ParallelConfig, StepCache, StepCacheKind};
use xfuser_core::scheduler::Scheduler;
use xfuser_layers::tensor_parallel::SplitWeights;
use xfuser_pipelines::denoise::{denoise, denoise_with_cache, Guidance};
use xfuser_pipelines::pipefusion::{denoise_pipefusion, PipeFusionConfig};
use xfuser_pipelines::step_cache::step_cacher_with_pattern;
use xfuser_schedulers::scheduling_dpmsolver_multistep::DPMSolverMultistepScheduler;
use xfuser_transformers::pixart_transformer_2d::{
    Config, PixArtTransformer2DModel, ASPECT_RATIO, RESOLUTION,
};

#[derive(Parser)]
#[command(
    name = "xfuser-bench",
    about = "CPU benchmarks of xfuser-rs (compare with scripts/bench_pytorch.py)"
)]
struct Cli {
    /// Keep glibc malloc's defaults: fresh pages (page faults, zeroing) for every large tensor.
    #[arg(long, global = true)]
    system_malloc: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One PixArt-α transformer forward: warm-up, then the median of several.
    PixartForward(ForwardArgs),
    /// One SD3 transformer forward at SD3-medium width: warm-up, then the median of several.
    Sd3Forward(sd3::Sd3ForwardArgs),
    /// One Flux.1-dev transformer forward at full width, few blocks: warm-up, then the median.
    FluxForward(flux::FluxForwardArgs),
    /// The 20-step denoising loop with CFG (transformer + DPM-Solver++).
    Pipeline(PipelineArgs),
    /// candle's sgemm GFLOP/s on the forward's matrix products, and their total time.
    GemmFloor(ModelArgs),
    /// The loop on `--world` rank threads with a parallel method.
    Parallel(ParallelArgs),
    /// The full-size PixArt VAE decode, serial vs patch-parallel: time and peak memory.
    Vae(vae::VaeArgs),
}

/// The model and input shapes, identical to scripts/bench_pytorch.py's.
#[derive(Args, Clone)]
struct ModelArgs {
    /// Image side in pixels (the latent is resolution/8).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Batch of the transformer (2 = one image with classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 28)]
    layers: usize,
    /// Text tokens (PixArt-α: 120).
    #[arg(long, default_value_t = 120)]
    text_len: usize,
    /// The config's sample_size; default resolution/8, as the PixArt-α checkpoint for that
    /// resolution (128 turns on the resolution/aspect-ratio conditioning).
    #[arg(long)]
    sample_size: Option<usize>,
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Print the time of each part of the forward (embed, per-block, head) too.
    #[arg(long)]
    parts: bool,
    /// Pass the same text tensor to every forward, so that its caption projection and
    /// cross-attention keys/values come from the model's cache after the first (as in a
    /// denoising loop); by default each forward gets a new tensor and computes them.
    #[arg(long)]
    reuse_text: bool,
}

#[derive(Args, Clone)]
struct PipelineArgs {
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 28)]
    layers: usize,
    #[arg(long, default_value_t = 120)]
    text_len: usize,
    #[arg(long)]
    sample_size: Option<usize>,
    #[arg(long, default_value_t = 4.5)]
    guidance_scale: f64,
    /// Forwards run before timing (pages the weights in).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Whole loops timed; the median is printed.
    #[arg(long, default_value_t = 1)]
    iters: usize,
    /// Run the loop with First-Block-Cache, its decisions replayed from --cache-pattern.
    #[arg(long, conflicts_with = "use_teacache")]
    use_fbcache: bool,
    /// Run the loop with TeaCache, its decisions replayed from --cache-pattern.
    #[arg(long)]
    use_teacache: bool,
    /// With a cache: one letter per step, C (every block runs) or S (the cached residual is
    /// reused). Random weights make the caches' own decisions meaningless, so the benchmark
    /// replays a pattern a trained model chose (docs/performance.md says which).
    #[arg(long)]
    cache_pattern: Option<String>,
}

impl PipelineArgs {
    /// The cache to run the loop with, and the steps whose blocks all run.
    fn cache(&self) -> Result<Option<(StepCache, Vec<bool>)>> {
        let kind = match (self.use_fbcache, self.use_teacache) {
            (false, false) => return Ok(None),
            (true, _) => StepCacheKind::FirstBlock,
            (false, true) => StepCacheKind::TeaCache,
        };
        let Some(pattern) = &self.cache_pattern else {
            bail!(
                "{}: give the skip pattern with --cache-pattern (C/S per step)",
                kind.flag()
            );
        };
        let computed = pattern
            .chars()
            .map(|c| match c {
                'C' | 'c' => Ok(true),
                'S' | 's' => Ok(false),
                other => bail!("--cache-pattern: `{other}` is not C or S"),
            })
            .collect::<Result<Vec<_>>>()?;
        if computed.len() != self.steps || !computed.first().copied().unwrap_or(false) {
            bail!(
                "--cache-pattern {pattern}: needs one letter per step ({}), starting with C",
                self.steps
            );
        }
        let cache = StepCache {
            kind,
            threshold: StepCache::DEFAULT_THRESHOLD,
        };
        Ok(Some((cache, computed)))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ParallelMode {
    Cfg,
    Ulysses,
    Ring,
    Pipefusion,
    /// Tensor parallelism: each rank a shard of every attention and feed-forward.
    Tp,
}

#[derive(Args, Clone)]
struct ParallelArgs {
    #[arg(long, value_enum)]
    mode: ParallelMode,
    /// Rank threads (the method's degree).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Run every rank's parallel work on the one global thread pool instead of a pool of its
    /// own with its share of the cores (the runtime's default, `RankThreads::Split`).
    #[arg(long)]
    shared_pool: bool,
    /// PipeFusion: patches per image (default: the degree, as xDiT).
    #[arg(long)]
    num_pipeline_patch: Option<usize>,
    /// PipeFusion: steps run synchronously on the whole image first.
    #[arg(long, default_value_t = 1)]
    warmup_steps: usize,
    /// Print when each rank finishes each step (shows warmup and pipeline bubbles).
    #[arg(long)]
    trace_steps: bool,
    #[command(flatten)]
    pipeline: PipelineArgs,
}

/// Weights drawn on request, like torch's default initialisation (uniform ±1/√fan_in for
/// matrices, ±0.02 for vectors), from a fast deterministic generator seeded by the name.
/// Position tables (`pos_embed`, a buffer diffusers computes) are absent, so a model computes
/// its sin-cos table as diffusers does.
struct RandomWeights;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn uniform(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            let u = (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * bound
        })
        .collect()
}

fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let bound = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            1.0 / (fan_in as f32).sqrt()
        } else {
            0.02
        };
        let data = uniform(s.elem_count(), bound, name_seed(name));
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no shape for `{name}`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        name.rsplit('.').next() != Some("pos_embed")
    }
}

fn config(m: &ModelArgs) -> Result<Config> {
    let sample_size = m.sample_size.unwrap_or(m.resolution / 8);
    let cfg: Config = serde_json::from_value(serde_json::json!({
        "num_layers": m.layers,
        "sample_size": sample_size,
        "caption_channels": 4096,
        "in_channels": 4,
        "out_channels": 8,
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "cross_attention_dim": 1152,
        "patch_size": 2,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": false,
        "norm_eps": 1e-6,
    }))?;
    Ok(cfg)
}

fn build_model(cfg: &Config) -> Result<PixArtTransformer2DModel> {
    build_stage(cfg, None)
}

/// The whole model (`stage` None) or one PipeFusion stage of it; a weight is drawn from its
/// name, so a stage's blocks equal the whole model's.
fn build_stage(cfg: &Config, stage: Option<&PipelineStage>) -> Result<PixArtTransformer2DModel> {
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    PixArtTransformer2DModel::new_stage(cfg, vb, stage).context("building the PixArt transformer")
}

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    // Uniform with unit variance: the benchmark needs realistic magnitudes, not Gaussians.
    let n = shape.iter().product();
    Ok(Tensor::from_vec(
        uniform(n, 3f32.sqrt(), seed),
        shape,
        &Device::Cpu,
    )?)
}

/// Micro-conditioning inputs when the config uses them: (B, 2) resolution, (B, 1) aspect ratio.
/// A PixArt forward's conditioning: the text, its mask (all ones), and the micro-conditioning
/// of a square `res` image when the model uses it.
fn pixart_conditioning(cfg: &Config, text: Tensor, res: usize) -> Result<Conditioning> {
    let (batch, len, _) = text.dims3()?;
    let mut conditioning = Conditioning::new()
        .with(names::ENCODER_HIDDEN_STATES, text)
        .with(
            names::ENCODER_ATTENTION_MASK,
            Tensor::ones((batch, len), DType::F32, &Device::Cpu)?,
        );
    if cfg.use_additional_conditions() {
        let r = Tensor::from_vec(
            [res as f32, res as f32].repeat(batch),
            (batch, 2),
            &Device::Cpu,
        )?;
        let a = Tensor::from_vec(vec![1f32; batch], (batch, 1), &Device::Cpu)?;
        conditioning.insert(RESOLUTION, r);
        conditioning.insert(ASPECT_RATIO, a);
    }
    Ok(conditioning)
}

/// One matrix-product shape of the forward: `count` products of (m, k)·(k, n).
#[derive(Debug, Clone, Copy)]
struct Gemm {
    what: &'static str,
    count: usize,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
}

impl Gemm {
    fn flops(&self) -> f64 {
        2.0 * (self.count * self.batch * self.m * self.k * self.n) as f64
    }
}

/// Every matrix product of a PixArt forward (the Linear layers stack the batch into rows).
fn forward_gemms(cfg: &Config, m: &ModelArgs) -> Vec<Gemm> {
    let (b, layers, l) = (m.batch, m.layers, m.text_len);
    let d = cfg.inner_dim();
    let lat = m.resolution / 8;
    let tokens = (lat / cfg.patch_size) * (lat / cfg.patch_size);
    let (heads, dh) = (cfg.num_attention_heads, cfg.attention_head_dim);
    let caption = cfg.caption_channels.unwrap_or(d);
    let p2c = cfg.patch_size * cfg.patch_size;
    let g = |what, count, batch, m, k, n| Gemm {
        what,
        count,
        batch,
        m,
        k,
        n,
    };
    let mut v = vec![
        g(
            "linear N·D·D (q,k,v,out; cross q,out)",
            6 * layers,
            1,
            b * tokens,
            d,
            d,
        ),
        g("linear ff up N·D·4D", layers, 1, b * tokens, d, 4 * d),
        g("linear ff down N·4D·D", layers, 1, b * tokens, 4 * d, d),
        g("linear cross k,v L·D·D", 2 * layers, 1, b * l, d, d),
        g("attn self q·kᵀ", layers, b * heads, tokens, dh, tokens),
        g("attn self p·v", layers, b * heads, tokens, tokens, dh),
        g("attn cross q·kᵀ", layers, b * heads, tokens, dh, l),
        g("attn cross p·v", layers, b * heads, tokens, l, dh),
        g("caption linear_1", 1, 1, b * l, caption, d),
        g("caption linear_2", 1, 1, b * l, d, d),
        g("patch embed", 1, 1, b * tokens, cfg.in_channels * p2c, d),
        g("proj_out", 1, 1, b * tokens, d, p2c * cfg.out_channels()),
        g("adaln linear", 1, 1, b, d, 6 * d),
        g("timestep mlp", 1, 1, b, 256, d),
        g("timestep mlp 2", 1, 1, b, d, d),
    ];
    if cfg.use_additional_conditions() {
        v.push(g("size mlps", 2, 1, 3 * b, 256, d / 3));
        v.push(g("size mlps 2", 2, 1, 3 * b, d / 3, d / 3));
    }
    v
}

fn total_flops(gemms: &[Gemm]) -> f64 {
    gemms.iter().map(Gemm::flops).sum()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

fn report(seconds: f64, flops: f64) {
    if !is_lead_process() {
        return;
    }
    println!("rust_seconds={seconds:.4}");
    println!("gflops={:.2}", flops / seconds / 1e9);
}

fn pixart_forward(args: &ForwardArgs) -> Result<()> {
    let m = &args.model;
    let cfg = config(m)?;
    let t0 = Instant::now();
    let model = build_model(&cfg)?;
    eprintln!(
        "model built in {:.1}s: {} layers, hidden {}, sample_size {}, threads {}",
        t0.elapsed().as_secs_f64(),
        m.layers,
        cfg.inner_dim(),
        cfg.sample_size,
        candle_core::utils::get_num_threads()
    );
    let lat = m.resolution / 8;
    let latent = randn(&[m.batch, cfg.in_channels, lat, lat], 1)?;
    let caption = cfg.caption_channels.unwrap_or(cfg.inner_dim());
    let text = randn(&[m.batch, m.text_len, caption], 2)?;
    let timestep = Tensor::full(999f32, m.batch, &Device::Cpu)?;
    // A new text tensor for every forward unless --reuse-text: the model caches the caption
    // projection and the cross-attention keys/values per text tensor (as a denoising loop
    // reuses them), and torch recomputes them in every forward.
    let text_for_forward = || -> Result<Tensor> {
        Ok(if args.reuse_text {
            text.clone()
        } else {
            text.copy()?
        })
    };
    let flops = total_flops(&forward_gemms(&cfg, m));
    let mut conditioning = || pixart_conditioning(&cfg, text_for_forward()?, m.resolution);
    let runs = Runs {
        warmup: args.warmup,
        iters: args.iters,
        parts: args.parts,
    };
    let times = time_forwards(&model, &latent, &timestep, &runs, &mut conditioning)?;
    report(median(times), flops);
    Ok(())
}

/// How a forward benchmark runs: `warmup` untimed forwards, then `iters` timed ones; with
/// `parts`, each timed one as embed, blocks and head (one stream), each part timed.
struct Runs {
    warmup: usize,
    iters: usize,
    parts: bool,
}

/// The forward benchmarks' loop: every forward gets the conditioning `conditioning` returns.
/// Returns the timed forwards' seconds.
fn time_forwards(
    model: &dyn Backbone,
    latent: &Tensor,
    timestep: &Tensor,
    runs: &Runs,
    conditioning: &mut dyn FnMut() -> Result<Conditioning>,
) -> Result<Vec<f64>> {
    let layers = model.info().num_layers;
    let ctx = ForwardContext::default();
    let mut times = Vec::new();
    for i in 0..runs.warmup + runs.iters {
        let conditioning = conditioning()?;
        let inputs = BackboneInputs {
            hidden_states: latent,
            timestep,
            conditioning: &conditioning,
        };
        if i < runs.warmup {
            model.forward(&inputs, &ctx)?;
            continue;
        }
        let i = i - runs.warmup;
        let t = Instant::now();
        let out = if runs.parts {
            let t_embed = Instant::now();
            let state = model.embed(&inputs, &ctx)?;
            let embed = t_embed.elapsed().as_secs_f64();
            let t_blocks = Instant::now();
            let state = model.blocks(state, 0..layers, &ctx)?;
            let blocks = t_blocks.elapsed().as_secs_f64();
            let t_head = Instant::now();
            let out = model.head(state, &ctx)?;
            eprintln!(
                "  parts: embed {embed:.4}s, blocks {blocks:.4}s ({:.4}s/block), head {:.4}s",
                blocks / layers as f64,
                t_head.elapsed().as_secs_f64()
            );
            out
        } else {
            model.forward(&inputs, &ctx)?
        };
        let s = t.elapsed().as_secs_f64();
        eprintln!("forward {i}: {s:.4}s, output {:?}", out.dims());
        times.push(s);
    }
    Ok(times)
}

fn pipeline(args: &PipelineArgs, parallel: Option<&ParallelArgs>) -> Result<()> {
    let m = ModelArgs {
        resolution: args.resolution,
        batch: 2,
        layers: args.layers,
        text_len: args.text_len,
        sample_size: args.sample_size,
    };
    let cfg = config(&m)?;
    let model = build_model(&cfg)?;
    let stages = match parallel {
        Some(p) if matches!(p.mode, ParallelMode::Pipefusion) => (0..p.world)
            .map(|index| {
                let stage = PipelineStage {
                    index,
                    num_stages: p.world,
                    layer_counts: None,
                };
                build_stage(&cfg, Some(&stage))
            })
            .collect::<Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    let shards = match parallel {
        Some(p) if matches!(p.mode, ParallelMode::Tp) => {
            let in_process = process_world().map(|w| w.rank());
            (0..p.world)
                .map(|index| {
                    // Under mpirun a process builds only its own shard.
                    if in_process.is_some_and(|me| me != index) {
                        return Ok(None);
                    }
                    let vb =
                        VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
                    let split = SplitWeights::VarBuilder(vb.clone());
                    let tp = TpRank::new(index, p.world)?;
                    PixArtTransformer2DModel::new_shard(&cfg, vb, split, tp, None)
                        .map(Some)
                        .context("building a PixArt tensor-parallel shard")
                })
                .collect::<Result<Vec<_>>>()?
        }
        _ => Vec::new(),
    };
    let mut scheduler = DPMSolverMultistepScheduler::from_config(
        &serde_json::json!({}),
        std::path::Path::new("<bench: DPMSolverMultistepScheduler defaults>"),
    )?;
    scheduler.set_timesteps(args.steps)?;
    let lat = args.resolution / 8;
    let caption = cfg.caption_channels.unwrap_or(cfg.inner_dim());
    let text = |seed| -> Result<Conditioning> {
        pixart_conditioning(
            &cfg,
            randn(&[1, args.text_len, caption], seed)?,
            args.resolution,
        )
    };
    let guidance = Guidance {
        positive: text(2)?,
        negative: Some(text(3)?),
        guidance_scale: args.guidance_scale,
    };
    let latents = (randn(&[1, cfg.in_channels, lat, lat], 1)? * scheduler.init_noise_sigma())?;
    let ctx = ForwardContext::default();
    if args.warmup > 0 {
        let conditioning = Conditioning::cat_batch(&[&guidance.positive, &guidance.positive])?;
        let input = Tensor::cat(&[&latents, &latents], 0)?;
        let timestep = Tensor::full(999f32, 2, &Device::Cpu)?;
        let inputs = BackboneInputs {
            hidden_states: &input,
            timestep: &timestep,
            conditioning: &conditioning,
        };
        for _ in 0..args.warmup {
            model.forward(&inputs, &ctx)?;
        }
    }
    let flops = total_flops(&forward_gemms(&cfg, &m)) * args.steps as f64;
    let cache = args.cache()?;
    if cache.is_some() && parallel.is_some() {
        bail!("--use-fbcache / --use-teacache: the parallel benchmark runs without a cache");
    }
    let mut times = Vec::new();
    for i in 0..args.iters.max(1) {
        let t = Instant::now();
        let out = match (parallel, &cache) {
            (None, None) => denoise(
                &model,
                &scheduler,
                latents.clone(),
                &guidance,
                &ctx,
                None,
                None,
                &mut |_, _| Ok(()),
            )?,
            (None, Some((config, computed))) => {
                let mut cacher = step_cacher_with_pattern(config, computed.clone())?;
                let out = denoise_with_cache(
                    &model,
                    &scheduler,
                    latents.clone(),
                    &guidance,
                    &ctx,
                    None,
                    None,
                    Some(cacher.as_mut()),
                    &mut |_, _| Ok(()),
                )?;
                let stats = cacher.stats();
                eprintln!(
                    "cache: computed {} of {} transformer steps",
                    stats.computed, stats.steps
                );
                out
            }
            (Some(p), _) => {
                let models = Models {
                    whole: &model,
                    stages: &stages,
                    shards: &shards,
                };
                parallel_loop(models, &scheduler, &latents, &guidance, p)?
            }
        };
        let s = t.elapsed().as_secs_f64();
        let mean = out.mean_all()?.to_scalar::<f32>()?;
        if !is_lead_process() {
            times.push(s);
            continue;
        }
        eprintln!(
            "loop {i}: {s:.3}s ({} steps), latents mean {mean:.5}",
            args.steps
        );
        times.push(s);
    }
    report(median(times), flops);
    Ok(())
}

/// Times `count`·`batch` products of one shape; returns seconds per product (median of runs).
fn time_gemm(g: &Gemm) -> Result<f64> {
    let a = randn(&[g.batch, g.m, g.k], 11)?;
    // A row-major (k, n) rhs: the layout the model's linear layers use
    // (xfuser_core::kernels::gemm_friendly_weight).
    let b = randn(&[g.batch, g.k, g.n], 12)?;
    // Single products go the linear layers' way, kernels::matmul_t with the (n, k) weight
    // stored column-major; batched ones (attention) through candle's batched matmul.
    let single = if g.batch == 1 {
        Some((a.reshape((g.m, g.k))?, b.reshape((g.k, g.n))?.t()?))
    } else {
        None
    };
    let product = || -> Result<Tensor> {
        Ok(match &single {
            Some((a, w)) => xfuser_core::kernels::matmul_t(a, w)?,
            None => a.matmul(&b)?,
        })
    };
    let flops = 2.0 * (g.batch * g.m * g.k * g.n) as f64;
    // Enough repetitions for ~0.2 s per sample.
    let reps = ((0.2e9 * 100.0 / flops) as usize).clamp(1, 2000);
    product()?;
    let mut samples = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            product()?;
        }
        samples.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(median(samples))
}

fn gemm_floor(m: &ModelArgs) -> Result<()> {
    let cfg = config(m)?;
    let gemms = forward_gemms(&cfg, m);
    let mut floor = 0.0;
    for g in &gemms {
        let s = time_gemm(g)?;
        floor += s * g.count as f64;
        println!(
            "gemm {:<40} {:>3}x [{}x] {}x{}x{}: {:.1} GFLOP/s, {:.4}s in all",
            g.what,
            g.count,
            g.batch,
            g.m,
            g.k,
            g.n,
            g.flops() / g.count as f64 / s / 1e9,
            s * g.count as f64
        );
    }
    let flops = total_flops(&gemms);
    println!("model_gflop={:.2}", flops / 1e9);
    println!("gemm_floor_seconds={floor:.4}");
    report(floor, flops);
    Ok(())
}

/// The transformer of a parallel run: the whole model, one part per stage for PipeFusion,
/// one shard per tp rank for tensor parallelism (None: another process's).
#[derive(Clone, Copy)]
struct Models<'a> {
    whole: &'a PixArtTransformer2DModel,
    stages: &'a [PixArtTransformer2DModel],
    shards: &'a [Option<PixArtTransformer2DModel>],
}

/// The loop on `--world` rank threads (one process, the local backend), as the parallel
/// runtime runs it; returns the latents of the rank that holds them (rank 0, or PipeFusion's
/// last stage).
fn parallel_loop(
    models: Models<'_>,
    scheduler: &DPMSolverMultistepScheduler,
    latents: &Tensor,
    guidance: &Guidance,
    p: &ParallelArgs,
) -> Result<Tensor> {
    let (mode, world, args) = (p.mode, p.world, &p.pipeline);
    let config = match mode {
        ParallelMode::Cfg => ParallelConfig {
            use_cfg_parallel: true,
            ..Default::default()
        },
        ParallelMode::Ulysses => ParallelConfig {
            ulysses_degree: world,
            ..Default::default()
        },
        ParallelMode::Ring => ParallelConfig {
            ring_degree: world,
            ..Default::default()
        },
        ParallelMode::Pipefusion => ParallelConfig {
            pipefusion_parallel_degree: world,
            num_pipeline_patch: p.num_pipeline_patch,
            warmup_steps: p.warmup_steps,
            ..Default::default()
        },
        ParallelMode::Tp => ParallelConfig {
            tensor_parallel_degree: world,
            ..Default::default()
        },
    };
    config.validate()?;
    let mesh = RankMesh::new(&config)?;
    if mesh.world_size() != world {
        bail!(
            "--mode {} runs on {} ranks, not --world {world}",
            mode_name(mode),
            mesh.world_size()
        );
    }
    let meta = input_metadata(
        args.resolution,
        args.resolution,
        1,
        args.steps,
        &ShapeParams {
            sp_degree: mesh.sp_degree(),
            num_pipeline_patch: config.pipeline_patches(),
            patch_size: models.whole.info().patch_size,
            vae_scale_factor: 8,
        },
    )?;
    let options = LaunchOptions {
        threads: if p.shared_pool {
            RankThreads::Shared
        } else {
            RankThreads::Split
        },
        ..LaunchOptions::with_timeout(std::time::Duration::from_secs(3600))
    };
    let run = |rank: RankContext| -> xfuser_core::Result<Option<Tensor>> {
        let (start, me) = (Instant::now(), rank.rank());
        let no_steps = &mut |i: usize, n: usize| {
            if p.trace_steps {
                eprintln!(
                    "rank {me}: step {i}/{n} done at {:.3}s",
                    start.elapsed().as_secs_f64()
                );
            }
            Ok(())
        };
        match mode {
            ParallelMode::Pipefusion => {
                let config = PipeFusionConfig {
                    backbone: &models.stages[rank.coords().pp],
                    scheduler,
                    rank: &rank,
                    metadata: &meta,
                    warmup_steps: p.warmup_steps,
                    zero_stale_kv: false,
                };
                denoise_pipefusion(&config, latents.clone(), guidance, None, no_steps)
            }
            ParallelMode::Tp => {
                let shard = models.shards[rank.coords().tp].as_ref().ok_or_else(|| {
                    xfuser_core::Error::invalid("this process's tp shard was not built")
                })?;
                let ctx = ForwardContext::default().with_tp(Some(rank.tp_group().clone()));
                // Serial CFG: both halves in one batch on every tp rank.
                denoise(
                    shard,
                    scheduler,
                    latents.clone(),
                    guidance,
                    &ctx,
                    None,
                    None,
                    no_steps,
                )
                .map(|l| (rank.coords().tp == 0).then_some(l))
            }
            ParallelMode::Cfg => denoise(
                models.whole,
                scheduler,
                latents.clone(),
                guidance,
                &ForwardContext::default(),
                Some(rank.cfg_group()),
                None,
                no_steps,
            )
            .map(Some),
            ParallelMode::Ulysses | ParallelMode::Ring => {
                let ctx = ForwardContext::sequence_parallel(
                    mode_name(mode),
                    SpContext::from_rank(&rank, meta.full.clone())?,
                )?;
                denoise(
                    models.whole,
                    scheduler,
                    latents.clone(),
                    guidance,
                    &ctx,
                    None,
                    None,
                    no_steps,
                )
                .map(Some)
            }
        }
    };
    let Some(world) = process_world() else {
        let outs = launch_local(&mesh, &options, run)?;
        report_bytes(&options.stats);
        return outs
            .into_iter()
            .flatten()
            .next()
            .context("no rank returned the latents");
    };
    // One process per rank: this process runs its own rank, and the rank that holds the
    // latents shares them with the world (which also waits for every rank to finish).
    let stats = CommStats::new();
    let rank = world.rank_context(&mesh, &stats, options.timeout)?;
    let world_group = rank.world().clone();
    let own = run(rank)?;
    report_bytes(&stats);
    let held = Tensor::new(&[u8::from(own.is_some())], &Device::Cpu)?;
    let holders = world_group.all_gather_tensors(&held)?;
    let holder = holders
        .iter()
        .position(|h| h.to_vec1::<u8>().is_ok_and(|v| v[0] == 1))
        .context("no rank returned the latents")?;
    let latents = match own {
        Some(l) => l,
        None => latents.zeros_like()?,
    };
    Ok(world_group.broadcast(&latents, holder)?)
}

/// What rank 0 sent in the loop, to stderr (the same for threads and processes).
fn report_bytes(stats: &CommStats) {
    if is_lead_process() {
        let sent = stats.sum(|k| k.rank == 0).bytes_sent;
        eprintln!("comm: rank 0 sent {sent} bytes");
    }
}

/// Whether this process prints results: always, unless it is a rank other than 0 of a
/// launched job.
fn is_lead_process() -> bool {
    process_world().is_none_or(|w| w.rank() == 0)
}

fn mode_name(mode: ParallelMode) -> &'static str {
    match mode {
        ParallelMode::Cfg => "cfg",
        ParallelMode::Ulysses => "ulysses",
        ParallelMode::Ring => "ring",
        ParallelMode::Pipefusion => "pipefusion",
        ParallelMode::Tp => "tp",
    }
}

fn parallel(args: &ParallelArgs) -> Result<()> {
    pipeline(&args.pipeline, Some(args))
}

/// This process's peak resident memory so far (`VmHWM` of /proc/self/status), in KiB.
fn peak_rss_kib() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("/proc/self/status has no VmHWM line")?;
    line.trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("VmHWM `{}` is not a number of kB", line.trim()))
}

/// Counts each rank thread's allocations for the `vae` subcommand's memory passes; threads
/// without a tag (everything else) pay one thread-local read per allocation.
#[global_allocator]
static ALLOCATOR: xfuser_core::alloc::TaggedAllocator = xfuser_core::alloc::TaggedAllocator;

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Under mpirun, this process becomes one rank; MPI is finalised when this is dropped.
    #[cfg(feature = "mpi")]
    let _universe = xfuser_mpi::init_from_env()?;
    if !cli.system_malloc {
        xfuser_core::alloc::keep_freed_memory_for_reuse();
    }
    match &cli.command {
        Command::PixartForward(a) => pixart_forward(a),
        Command::Sd3Forward(a) => sd3::sd3_forward(a),
        Command::FluxForward(a) => flux::flux_forward(a),
        Command::Pipeline(a) => pipeline(a, None),
        Command::GemmFloor(m) => gemm_floor(m),
        Command::Parallel(a) => parallel(a),
        Command::Vae(a) => vae::vae(a),
    }
}
