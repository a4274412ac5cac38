//! The `xfuser` command line as a library function, so a binary that links extra models (a
//! plugin crate with its own registrations) gets the whole CLI by calling [`main`].

use std::path::{Path, PathBuf};

use crate::bundled::{bundled_defaults, bundled_model_dir, BUNDLED_MODEL_NAME};
use crate::core::distributed::{check_world_size, process_world, RankMesh};
use crate::core::engine::{
    EngineConfig, OutputType, ParallelConfig, PipelineOutput, RuntimeConfig, StepCache,
    StepCacheKind,
};
use crate::core::pipeline::DiffusionPipeline;
use crate::core::registry::{attention_processor_entry, registered, Kind};
use crate::pipelines::xFuserPipeline;
use crate::request::{GenerateParams, DEFAULT_SEED};
use crate::serve::ServeConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "xfuser",
    version,
    about = "Parallel inference for diffusion transformers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Generate images (or latents) from prompts.
    Generate(GenerateArgs),
    /// Serve the model over HTTP: it is loaded once and runs one request at a time.
    Serve(ServeArgs),
    /// Classify pictures with a transformers image classifier (ViT), on dp × tp × pp ranks.
    Classify(ClassifyArgs),
    /// List the registered pipelines, transformers, schedulers, attention processors and
    /// classifiers.
    List,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputKind {
    Pil,
    Latent,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

/// `--device`: `cpu`, `cuda` (under a launcher: the GPU of this process's local rank, else
/// GPU 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda(Option<usize>),
}

fn parse_device(value: &str) -> std::result::Result<DeviceArg, String> {
    match value {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(None)),
        _ => value
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(|i| DeviceArg::Cuda(Some(i)))
            .ok_or_else(|| format!("expected cpu, cuda or cuda:N (N a GPU index), got `{value}`")),
    }
}

// Flag names follow xDiT's (with dashes; its underscore spellings are accepted as aliases).
#[derive(Args)]
struct GenerateArgs {
    /// A diffusers pipeline folder or a Hugging Face Hub id; default: the bundled tiny model.
    #[arg(long)]
    model: Option<String>,
    /// A prompt; repeat the flag (or give several values) for several images.
    #[arg(long, num_args = 1..)]
    prompt: Vec<String>,
    #[arg(long, alias = "negative_prompt", default_value = "")]
    negative_prompt: String,
    /// Image height in pixels; default: the model's.
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels; default: the model's.
    #[arg(long)]
    width: Option<usize>,
    /// Denoising steps; default: 20 (the bundled model: its own, see docs/trained-model.md).
    #[arg(long, alias = "num_inference_steps")]
    num_inference_steps: Option<usize>,
    /// Classifier-free guidance scale (off at ≤ 1); default: 4.5 (the bundled model: its own).
    #[arg(long, alias = "guidance_scale")]
    guidance_scale: Option<f64>,
    /// Flux: classifier-free guidance with --negative-prompt, on above 1 (diffusers'
    /// true_cfg_scale); --guidance-scale is Flux-dev's embedded guidance.
    #[arg(long, alias = "true_cfg_scale", default_value_t = 1.0)]
    true_cfg_scale: f64,
    #[arg(long, alias = "num_images_per_prompt", default_value_t = 1)]
    num_images_per_prompt: usize,
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    #[arg(long, alias = "output_type", value_enum, default_value = "pil")]
    output_type: OutputKind,
    #[arg(long, alias = "output_dir", default_value = "results")]
    output_dir: PathBuf,
    /// Generate at the requested size instead of the nearest trained aspect-ratio bin (the
    /// bundled model never bins: it has no aspect-ratio table).
    #[arg(long, alias = "no_use_resolution_binning")]
    no_use_resolution_binning: bool,
    /// Text tokens kept per prompt (T5); default: 120 (PixArt-α), 300 (PixArt-Σ), 256 (SD3),
    /// 512 (Flux).
    #[arg(long, alias = "max_sequence_length")]
    max_sequence_length: Option<usize>,
    /// The models' weights and activations (the latents and the scheduler stay in f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// cpu, cuda (under mpirun: the GPU of the process's local rank) or cuda:N; cuda needs a
    /// build with `--features cuda`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceArg,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// After a parallel run, print the bytes each process group moved, per op.
    #[arg(long, alias = "report_comm")]
    report_comm: bool,
    #[command(flatten)]
    parallel: ParallelArgs,
    #[command(flatten)]
    cache: CacheArgs,
}

/// How the model runs on its ranks: xDiT's parallel flags, shared by `generate` and `serve`.
#[derive(Args)]
struct ParallelArgs {
    #[arg(long, alias = "data_parallel_degree", default_value_t = 1)]
    data_parallel_degree: usize,
    #[arg(long, alias = "use_cfg_parallel")]
    use_cfg_parallel: bool,
    #[arg(long, alias = "ulysses_degree", default_value_t = 1)]
    ulysses_degree: usize,
    #[arg(long, alias = "ring_degree", default_value_t = 1)]
    ring_degree: usize,
    #[arg(long, alias = "pipefusion_parallel_degree", default_value_t = 1)]
    pipefusion_parallel_degree: usize,
    /// PipeFusion: patches the image is cut into; default: the PipeFusion degree.
    #[arg(long, alias = "num_pipeline_patch")]
    num_pipeline_patch: Option<usize>,
    /// PipeFusion: steps run synchronously on the whole image first (at least 1).
    #[arg(long, alias = "warmup_steps", default_value_t = 1)]
    warmup_steps: usize,
    /// PipeFusion: transformer blocks per stage, e.g. 14,14; default: an even split.
    #[arg(long, alias = "attn_layer_num_for_pp", value_delimiter = ',')]
    attn_layer_num_for_pp: Option<Vec<usize>>,
    #[arg(long, alias = "tensor_parallel_degree", default_value_t = 1)]
    tensor_parallel_degree: usize,
    /// Decode the VAE on every rank, each a band of the image's rows (about 1/N of the
    /// decode's memory per rank); no effect on one rank.
    #[arg(long, alias = "use_parallel_vae")]
    use_parallel_vae: bool,
}

/// Step caches (xDiT's flags), shared by `generate` and `serve`.
#[derive(Args)]
struct CacheArgs {
    /// First-Block-Cache: on steps where the first block's residual changed less than
    /// --cache-threshold since the last computed step, reuse the other blocks' residual.
    #[arg(long, alias = "use_fbcache")]
    use_fbcache: bool,
    /// TeaCache: sum the relative change of the first block's modulated input from step to
    /// step (rescaled by the model's polynomial where one is known); while the sum stays under
    /// --cache-threshold, reuse all the blocks' residual. First and last steps always run.
    #[arg(long, alias = "use_teacache")]
    use_teacache: bool,
    /// Relative L1 change below which a step reuses the cache (xDiT's default 0.12).
    #[arg(long, alias = "cache_threshold", default_value_t = StepCache::DEFAULT_THRESHOLD)]
    cache_threshold: f64,
}

impl CacheArgs {
    fn config(&self) -> Result<Option<StepCache>> {
        if !self.cache_threshold.is_finite() || self.cache_threshold < 0.0 {
            bail!(
                "--cache-threshold {}: must be a finite number ≥ 0",
                self.cache_threshold
            );
        }
        let kind = match (self.use_fbcache, self.use_teacache) {
            (true, true) => bail!("--use-fbcache and --use-teacache: choose one step cache"),
            (true, false) => StepCacheKind::FirstBlock,
            (false, true) => StepCacheKind::TeaCache,
            (false, false) => return Ok(None),
        };
        Ok(Some(StepCache {
            kind,
            threshold: self.cache_threshold,
        }))
    }
}

impl ParallelArgs {
    fn config(&self) -> ParallelConfig {
        ParallelConfig {
            data_parallel_degree: self.data_parallel_degree,
            use_cfg_parallel: self.use_cfg_parallel,
            pipefusion_parallel_degree: self.pipefusion_parallel_degree,
            ulysses_degree: self.ulysses_degree,
            ring_degree: self.ring_degree,
            tensor_parallel_degree: self.tensor_parallel_degree,
            num_pipeline_patch: self.num_pipeline_patch,
            warmup_steps: self.warmup_steps,
            attn_layer_num_for_pp: self.attn_layer_num_for_pp.clone(),
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// A diffusers pipeline folder or a Hugging Face Hub id; default: the bundled tiny model.
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0: any free port; the address is printed once the server listens.
    #[arg(long, default_value_t = 6000)]
    port: u16,
    /// Requests that may wait while one runs; more are refused with 503.
    #[arg(long, alias = "max_queue", default_value_t = 16)]
    max_queue: usize,
    /// Text tokens kept per prompt (T5), for every request; default: the pipeline's.
    #[arg(long, alias = "max_sequence_length")]
    max_sequence_length: Option<usize>,
    /// The models' weights and activations (the latents and the scheduler stay in f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// cpu, cuda or cuda:N; cuda needs a build with `--features cuda`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: DeviceArg,
    #[command(flatten)]
    parallel: ParallelArgs,
    #[command(flatten)]
    cache: CacheArgs,
    /// Test aid: a request with exactly this prompt fails inside the worker (500).
    #[arg(long, hide = true)]
    fail_on_prompt: Option<String>,
}

/// `xfuser classify`: LiBai's 3-D parallel layout (docs/vit.md).
#[derive(Args)]
struct ClassifyArgs {
    /// A transformers image-classification folder: config.json (architectures[0] names the
    /// model), model.safetensors, preprocessor_config.json.
    #[arg(long)]
    model: PathBuf,
    /// The pictures to classify (PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Where to write {"logits": [[…] per image], "labels": [top-1 label per image]}.
    #[arg(long, alias = "output_json")]
    output_json: PathBuf,
    /// The images split over this many groups.
    #[arg(long, alias = "data_parallel_degree", default_value_t = 1)]
    data_parallel_degree: usize,
    /// Attention heads and MLP split over this many ranks per stage.
    #[arg(long, alias = "tensor_parallel_degree", default_value_t = 1)]
    tensor_parallel_degree: usize,
    /// Encoder layers split into this many stages; images flow through them one at a time.
    #[arg(long, alias = "pipeline_parallel_degree", default_value_t = 1)]
    pipeline_parallel_degree: usize,
}

/// Runs the `xfuser` command line on the process's arguments and exits the process with status 1
/// after printing a one-line error when the command fails.
pub fn main() {
    // Activations are reused from the heap instead of fresh kernel-zeroed pages each time.
    crate::core::alloc::keep_freed_memory_for_reuse();
    let cli = Cli::parse();
    // `serve` logs one line per request at info level.
    let default_filter = match cli.command {
        Command::Serve(_) => "warn,xfuser::serve=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Plain text when stderr is a file or pipe (logs, tests), colours on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One device for the whole process: the process world's communicators (NCCL) and the
    // pipeline must share it (candle tells two handles on one GPU apart).
    let device = match cli_device(&cli.command) {
        Ok(device) => device,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    };
    // Under an MPI launcher this process becomes one rank of the job (with a CUDA device and
    // the `nccl` feature, its groups are NCCL communicators); the universe finalises MPI when
    // dropped at the end of `main`.
    #[cfg(feature = "mpi")]
    let universe = match crate::mpi::init_from_env_on(&device) {
        Ok(universe) => universe,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    };
    if let Some(world) = process_world() {
        // A panicking rank ends the job as a failing one does, instead of leaving its peers
        // to wait for it until their timeout.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            world.abort(101)
        }));
    }
    let result = match cli.command {
        Command::Generate(args) => generate(args, device),
        Command::Serve(args) => serve(args, device),
        Command::Classify(args) => classify(args),
        Command::List => {
            if is_lead_process() {
                list();
            }
            Ok(())
        }
    };
    if let Err(err) = result {
        match process_world() {
            // Met alike by every process before any work: said once, and every process
            // ends normally with status 1.
            Some(world) if err.downcast_ref::<Refusal>().is_some() => {
                if world.rank() == 0 {
                    eprintln!("error: {err:#}");
                }
                #[cfg(feature = "mpi")]
                drop(universe);
                std::process::exit(1);
            }
            // The root cause, printed once by the rank that met it; aborting ends every
            // process of the job, which may be waiting for this one.
            Some(world) => {
                eprintln!("error (rank {} of {}): {err:#}", world.rank(), world.size());
                world.abort(1)
            }
            None => {
                eprintln!("error: {err:#}");
                std::process::exit(1);
            }
        }
    }
    #[cfg(feature = "mpi")]
    drop(universe);
}

/// An error that every process of a launched job meets alike, before any of them loads or
/// runs anything (a refused flag or request), so that no process waits for another.
#[derive(Debug)]
struct Refusal(anyhow::Error);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Refusal {}

/// Runs the checks of `check`, marking its failure as a [`Refusal`].
fn refuse_early<T>(check: impl FnOnce() -> Result<T>) -> Result<T> {
    check().map_err(|e| anyhow::Error::new(Refusal(e)))
}

/// Refuses `command`, whose ranks are threads of one process, in a process a launcher started
/// as one rank of several.
fn refuse_under_launcher(command: &str) -> Result<()> {
    match process_world() {
        None => Ok(()),
        Some(world) => refuse_early(|| {
            bail!(
                "xfuser {command} runs its ranks as threads of one process; start it without \
                 the {} launcher (it was started as {} processes)",
                world.backend(),
                world.size()
            )
        }),
    }
}

/// Whether this process prints and writes: always, unless it is a rank other than 0 of a
/// launched job.
fn is_lead_process() -> bool {
    process_world().is_none_or(|w| w.rank() == 0)
}

fn list() {
    for kind in [
        Kind::Pipeline,
        Kind::Transformer,
        Kind::Scheduler,
        Kind::AttentionProcessor,
        Kind::Classifier,
    ] {
        println!("{}s:", kind.as_str());
        for name in registered(kind) {
            match attention_processor_entry(name) {
                Ok(entry) if kind == Kind::AttentionProcessor => {
                    println!("  {name}: {}", entry.description)
                }
                _ => println!("  {name}"),
            }
        }
    }
}

/// The device `command` runs on: its `--device` (cpu for the commands without one).
fn cli_device(command: &Command) -> Result<Device> {
    match command {
        Command::Generate(args) => device(args.device),
        Command::Serve(args) => device(args.device),
        Command::Classify(_) | Command::List => Ok(Device::Cpu),
    }
}

/// Opens the device `arg` names. `cuda` alone is the GPU of this process's local rank under a
/// launcher (one process per GPU), else GPU 0.
fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda(index) => cuda_device(index.unwrap_or_else(local_rank)),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device> {
    Device::new_cuda(index)
        .with_context(|| format!("--device cuda:{index}: cannot open GPU {index}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_index: usize) -> Result<Device> {
    bail!(
        "--device cuda: this xfuser was built without CUDA; rebuild it with `cargo build \
         --release --features cuda` (docs/gpu.md) or use --device cpu"
    )
}

/// This process's index among the job's processes on its node, as the launcher sets it (Open
/// MPI, MPICH's hydra, Slurm, torchrun); 0 outside a launcher.
fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

fn generate(args: GenerateArgs, device: Device) -> Result<()> {
    // Everything that can be refused is refused before the model is loaded.
    let (parallel, input, step_cache, dtype) = refuse_early(|| {
        let parallel = args.parallel.config();
        let defaults = request_defaults(args.model.as_deref());
        let input = GenerateParams {
            prompts: args.prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            height: args.height,
            width: args.width,
            num_inference_steps: args
                .num_inference_steps
                .unwrap_or(defaults.num_inference_steps),
            guidance_scale: args.guidance_scale.unwrap_or(defaults.guidance_scale),
            true_cfg_scale: args.true_cfg_scale,
            num_images_per_prompt: args.num_images_per_prompt,
            seed: args.seed,
            output_type: match args.output_type {
                OutputKind::Pil => OutputType::Pil,
                OutputKind::Latent => OutputType::Latent,
            },
            max_sequence_length: args.max_sequence_length,
            use_resolution_binning: !args.no_use_resolution_binning
                && defaults.use_resolution_binning,
        }
        .into_input()?;
        parallel.validate()?;
        check_world_size(RankMesh::new(&parallel)?.world_size())?;
        Ok((parallel, input, args.cache.config()?, dtype(args.dtype)))
    })?;
    let lead = is_lead_process();
    if lead {
        prepare_output_dir(&args.output_dir)?;
    }

    let runtime = runtime_config(step_cache, &args.parallel);
    let (pipeline, model_name) =
        load(args.model.as_deref(), (dtype, &device), &parallel, &runtime)?;

    let bar = progress_bar(input.num_inference_steps, args.quiet || !lead);
    let output = pipeline.generate(&input, &mut |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    if !lead {
        return Ok(());
    }

    let stem = format!(
        "{model_name}_result_dp{}_cfg{}_ulysses{}_ring{}_tp{}_pp{}_patch{}",
        parallel.data_parallel_degree,
        parallel.cfg_degree(),
        parallel.ulysses_degree,
        parallel.ring_degree,
        parallel.tensor_parallel_degree,
        parallel.pipefusion_parallel_degree,
        parallel.pipeline_patches(),
    );
    let written = write_outputs(&output, input.output_type, &args.output_dir, &stem)?;
    for path in written {
        println!("{}", path.display());
    }
    if let Some(stats) = output.cache_stats {
        eprintln!(
            "cache: computed {} of {} transformer steps",
            stats.computed, stats.steps
        );
    }
    if args.report_comm {
        report_comm(&output);
    }
    Ok(())
}

fn classify(args: ClassifyArgs) -> Result<()> {
    use crate::pipelines::classify::ParallelClassifier;
    use crate::pipelines::image_processing::read_rgb_image;
    refuse_under_launcher("classify")?;
    let parallel = ParallelConfig {
        data_parallel_degree: args.data_parallel_degree,
        tensor_parallel_degree: args.tensor_parallel_degree,
        pipefusion_parallel_degree: args.pipeline_parallel_degree,
        ..ParallelConfig::default()
    };
    // Every picture is read, and the output folder checked, before the model is loaded.
    let images = args
        .images
        .iter()
        .map(|path| read_rgb_image(path))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let out_dir = match args.output_json.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !out_dir.is_dir() {
        bail!(
            "--output-json {}: the folder {} does not exist",
            args.output_json.display(),
            out_dir.display()
        );
    }
    let classifier = ParallelClassifier::load(&args.model, &parallel)?;
    let result = classifier.classify(&images)?;
    let json = serde_json::json!({ "logits": result.logits, "labels": result.labels });
    write_atomically(&args.output_json, &format!("{json}\n"))?;
    for (path, label) in args.images.iter().zip(&result.labels) {
        println!("{}\t{label}", path.display());
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file beside it and a rename, so that `path`
/// is either absent or whole.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output.json".into());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::write(&tmp, text)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    Ok(())
}

/// The request defaults for `model` (None: the bundled model, which has its own).
fn request_defaults(model: Option<&str>) -> GenerateParams {
    match model {
        None => bundled_defaults(),
        Some(_) => GenerateParams::default(),
    }
}

/// The compute dtype of the models' weights and activations. The scheduler and the latents
/// between steps stay in f32 whatever it is (docs/user-guide.md).
fn dtype(arg: DTypeArg) -> DType {
    match arg {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    }
}

/// Builds the pipeline `model` names (default: the bundled one) and returns it with the name
/// output files and messages use.
fn load(
    model: Option<&str>,
    (dtype, device): (DType, &Device),
    parallel: &ParallelConfig,
    runtime: &RuntimeConfig,
) -> Result<(Box<dyn DiffusionPipeline>, String)> {
    let (model, model_name) = match model {
        Some(m) => (m.to_string(), model_display_name(m)),
        None => (
            bundled_model_dir()?.to_string_lossy().into_owned(),
            BUNDLED_MODEL_NAME.to_string(),
        ),
    };
    let mut engine = EngineConfig::new(model);
    engine.model.dtype = dtype;
    engine.model.device = device.clone();
    engine.parallel = parallel.clone();
    engine.runtime = runtime.clone();
    Ok((xFuserPipeline::from_pretrained(&engine)?, model_name))
}

/// How the ranks run: the step cache and whether they decode together.
fn runtime_config(step_cache: Option<StepCache>, parallel: &ParallelArgs) -> RuntimeConfig {
    RuntimeConfig {
        step_cache,
        use_parallel_vae: parallel.use_parallel_vae,
        ..RuntimeConfig::default()
    }
}

fn serve(args: ServeArgs, device: Device) -> Result<()> {
    refuse_under_launcher("serve")?;
    let parallel = args.parallel.config();
    parallel.validate()?;
    let runtime = runtime_config(args.cache.config()?, &args.parallel);
    if args.max_sequence_length == Some(0) {
        bail!("--max-sequence-length must be at least 1");
    }
    let dtype = dtype(args.dtype);
    let model_name = match &args.model {
        Some(m) => model_display_name(m),
        None => BUNDLED_MODEL_NAME.to_string(),
    };
    let config = ServeConfig {
        host: args.host.clone(),
        port: args.port,
        max_queue: args.max_queue,
        model_name,
        max_sequence_length: args.max_sequence_length,
        defaults: request_defaults(args.model.as_deref()),
        fail_on_prompt: args.fail_on_prompt.clone(),
    };
    crate::serve::run(
        config,
        || Ok(load(args.model.as_deref(), (dtype, &device), &parallel, &runtime)?.0),
        |addr| {
            use std::io::Write;
            println!("listening on http://{addr}");
            let _ = std::io::stdout().flush();
        },
    )
}

/// Sums each (group, op)'s counters over its ranks and prints one line for each, to stderr.
fn report_comm(output: &PipelineOutput) {
    let Some(stats) = &output.comm_stats else {
        eprintln!("communication: none (serial run)");
        return;
    };
    let mut totals: std::collections::BTreeMap<(String, String), (u64, u64)> =
        std::collections::BTreeMap::new();
    for (key, counts) in stats.snapshot() {
        let entry = totals
            .entry((key.group.clone(), key.op.to_string()))
            .or_default();
        entry.0 += counts.calls;
        entry.1 += counts.bytes_sent;
    }
    eprintln!("communication (summed over the group's ranks):");
    if totals.is_empty() {
        eprintln!("  none");
    }
    for ((group, op), (calls, bytes)) in totals {
        eprintln!("  {group:<24} {op:<16} {calls:>8} calls {bytes:>14} bytes sent");
    }
}

/// The last component of a folder path or Hub id, for output file names. A local folder is
/// named by its canonical path, so `--model .` names the files after the folder, not `.`.
fn model_display_name(model: &str) -> String {
    let canonical = Path::new(model)
        .is_dir()
        .then(|| std::fs::canonicalize(model).ok())
        .flatten()
        .map(|p| p.to_string_lossy().into_owned());
    let name = canonical.as_deref().unwrap_or(model);
    let trimmed = name.trim_end_matches('/');
    trimmed
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("model")
        .to_string()
}

/// Creates the output folder and proves it writable before any work is done.
fn prepare_output_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    let probe = dir.join(format!(".xfuser-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("output directory {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).with_context(|| format!("cannot clean up {}", probe.display()))?;
    Ok(())
}

fn progress_bar(steps: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed}<{eta}]")
    {
        bar.set_style(style);
    }
    bar
}

fn write_outputs(
    output: &PipelineOutput,
    output_type: OutputType,
    dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    match output_type {
        OutputType::Latent => {
            let path = dir.join(format!("{stem}_latents.safetensors"));
            let tmp = dir.join(format!(
                ".{stem}_latents.safetensors.tmp-{}",
                std::process::id()
            ));
            let tensors =
                std::collections::HashMap::from([("latents".to_string(), output.latents.clone())]);
            let saved = candle_core::safetensors::save(&tensors, &tmp)
                .map_err(anyhow::Error::from)
                .and_then(|()| std::fs::rename(&tmp, &path).map_err(anyhow::Error::from));
            if let Err(e) = saved {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.context(format!("writing {}", path.display())));
            }
            Ok(vec![path])
        }
        OutputType::Pil => {
            let mut written = Vec::new();
            for (i, image) in output.images.iter().enumerate() {
                let path = dir.join(format!("{stem}_{i}.png"));
                crate::pipelines::image::save_rgb_png(image, &path)
                    .with_context(|| format!("writing {}", path.display()))?;
                written.push(path);
            }
            Ok(written)
        }
    }
}
