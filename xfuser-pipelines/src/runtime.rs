//! The runtime every pipeline drives: it loads the transformer (whole, or one part per
//! PipeFusion stage), checks a request against the parallel configuration, starts the ranks,
//! gives each rank its share of the work (data-parallel rows, a CFG half, a sequence slice, a
//! pipeline stage), runs the denoising loop, and has the lead rank of each data-parallel group
//! decode (with `--use-parallel-vae`, every rank decodes a band of every image's rows). A pipeline states only what differs between models ([`DenoisingPipeline`]): how a
//! request becomes a job (text encoding, conditioning, initial latents, a scheduler with its
//! timesteps) and how latents become images. docs/model-contract.md describes the contract.
//!
//! Ranks are threads of this process ([`launch_local`]), or, when a launcher started this
//! process as one rank of several (a [`ProcessWorld`] is installed, e.g. under `mpirun`), this
//! process runs its own rank only and loads only its rank's part of the transformer. Every
//! rank prepares its job itself, from the same request, so that each sees exactly the serial
//! inputs.

use std::path::Path;

use candle_core::Tensor;
use xfuser_core::backbone::{Backbone, ForwardContext, PipelineStage, SpContext};
use xfuser_core::distributed::{
    check_world_size, launch_local, process_world, Axis, CfgUse, CommStats, InputMetadata,
    LaunchOptions, ProcessGroup, ProcessWorld, RankContext, RankCoords, RankMesh, RuntimeState,
    TpRank,
};
use xfuser_core::engine::{
    CacheStats, EngineConfig, InputConfig, OutputType, ParallelConfig, PipelineOutput, RgbImage,
    RuntimeConfig,
};
use xfuser_core::random::Generator;
use xfuser_core::registry::{
    load_transformer, resolve_class_name, transformer_entry, transformer_shape, Kind, LoadOptions,
};
use xfuser_core::scheduler::Scheduler;
use xfuser_core::{Error, Result};

use crate::denoise::{denoise_with_cache, Guidance};
use crate::pipefusion::{denoise_pipefusion, PipeFusionConfig};
use crate::step_cache::{step_cacher, StepCacher};

/// What the runtime needs to know of a request, fixed by the pipeline's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunShape {
    /// The size generated at, in pixels (the latent is `height / vae_scale_factor` rows).
    pub height: usize,
    pub width: usize,
    /// Images in the whole request.
    pub batch: usize,
    /// Whether the request uses classifier-free guidance: the pipeline decides.
    pub cfg: CfgUse,
}

/// What one rank denoises: made by the pipeline from the request.
pub struct DenoiseJob {
    /// (B, C, h, w) initial latents of the whole request, already scaled by the scheduler's
    /// `init_noise_sigma`.
    pub latents: Tensor,
    /// The conditioning of each side of classifier-free guidance (one side without it).
    pub guidance: Guidance,
    /// The scheduler, its timesteps set.
    pub scheduler: Box<dyn Scheduler>,
    /// The generator the initial noise was drawn from, for stochastic scheduler steps.
    pub generator: Generator,
}

/// What a pipeline supplies to the runtime.
pub trait DenoisingPipeline: Sync {
    /// The request resolved by the pipeline (sizes after binning, text lengths, ...).
    type Plan: Sync;

    /// Validates the request and fixes its sizes, before any work.
    fn plan(&self, input: &InputConfig) -> Result<(RunShape, Self::Plan)>;

    /// The job of the whole request: text encoding, conditioning, initial latents, scheduler.
    /// Called on every rank.
    fn prepare(&self, plan: &Self::Plan, input: &InputConfig) -> Result<DenoiseJob>;

    /// Final latents (B, C, h, w) to images, on the lead rank of a data-parallel group.
    fn decode(&self, plan: &Self::Plan, latents: &Tensor) -> Result<Vec<RgbImage>>;

    /// `--use-parallel-vae`: final latents (B, C, h, w) to images with the VAE decode split
    /// by rows over the members of `group` ([`crate::parallel_vae`]). Every member calls it
    /// with the same latents; member 0 returns the images, the others an empty list. The
    /// default refuses: a pipeline opts in by implementing it.
    fn decode_parallel(
        &self,
        _plan: &Self::Plan,
        _latents: &Tensor,
        _group: &ProcessGroup,
    ) -> Result<Vec<RgbImage>> {
        Err(Error::Unsupported(
            "--use-parallel-vae: this pipeline does not support the parallel VAE decode; run \
             without the flag"
                .into(),
        ))
    }
}

/// A loaded transformer and the parallel configuration it runs under.
pub struct DiTRuntime {
    /// The whole transformer, or one part per (PipeFusion stage, tensor-parallel position):
    /// stage-major, the tp position fastest. The ranks of the other axes (dp, cfg, sp) at the
    /// same (pp, tp) share one. A process that is one rank of a launched job holds only its own.
    transformers: Vec<Box<dyn Backbone>>,
    /// The (pp, tp) position of each entry of `transformers`.
    positions: Vec<(usize, usize)>,
    vae_scale_factor: usize,
    parallel: ParallelConfig,
    runtime: RuntimeConfig,
}

/// A rank's share of the request's batch: rows `start..start + len`.
#[derive(Debug, Clone, Copy)]
struct BatchSlice {
    start: usize,
    len: usize,
}

impl DiTRuntime {
    /// Loads the transformer in `dir` for `engine`'s parallel configuration. Its class must
    /// be one of `accepts` (the backbones `pipeline` is made for); degrees are checked against
    /// its config before any weights are read (tensor parallelism also against its
    /// registration), with PipeFusion each stage reads only its blocks, and with tensor
    /// parallelism each tp position only its shard of the split layers.
    pub fn load(
        dir: &Path,
        pipeline: &str,
        accepts: &[&str],
        vae_scale_factor: usize,
        engine: &EngineConfig,
    ) -> Result<Self> {
        let parallel = &engine.parallel;
        parallel.validate()?;
        let file = dir.join("config.json");
        let config = xfuser_core::config::read_json_value(&file)?;
        let name = xfuser_core::config::class_name_of(&config, &file)?;
        let class = resolve_class_name(Kind::Transformer, &name, &config);
        if !accepts.contains(&class) {
            return Err(Error::Config {
                file,
                field: "_class_name".into(),
                message: format!(
                    "{pipeline} runs {}, not `{name}`: the folder's model_index.json names the \
                     wrong pipeline for this transformer",
                    accepts.join(" or ")
                ),
            });
        }
        let tp = parallel.tensor_parallel_degree;
        if tp > 1 && !transformer_entry(&name, &config)?.tensor_parallel {
            return Err(Error::Unsupported(format!(
                "--tensor-parallel-degree {tp}: {class} does not support tensor parallelism \
                 (only {} does so far); use --tensor-parallel-degree 1 with data, CFG, \
                 Ulysses, Ring or PipeFusion parallelism",
                tensor_parallel_models()
            )));
        }
        if !parallel.is_serial() {
            let shape = transformer_shape(dir)?;
            RankMesh::new(parallel)?
                .validate_for_shape(shape.num_attention_heads, shape.num_layers)?;
        }
        let pp = parallel.pipefusion_parallel_degree;
        let positions: Vec<(usize, usize)> = match process_world() {
            Some(world) if !parallel.is_serial() => {
                let mesh = RankMesh::new(parallel)?;
                check_world_size(mesh.world_size())?;
                let coords = mesh.coords(world.rank());
                vec![(coords.pp, coords.tp)]
            }
            _ => (0..pp)
                .flat_map(|stage| (0..tp).map(move |position| (stage, position)))
                .collect(),
        };
        let mut transformers = Vec::with_capacity(positions.len());
        for &(index, position) in &positions {
            let options = LoadOptions {
                dtype: engine.model.dtype,
                device: engine.model.device.clone(),
                stage: (pp > 1).then(|| PipelineStage {
                    index,
                    num_stages: pp,
                    layer_counts: parallel.attn_layer_num_for_pp.clone(),
                }),
                tp: TpRank::new(position, tp)?,
            };
            transformers.push(load_transformer(dir, &options)?);
        }
        Ok(Self {
            transformers,
            positions,
            vae_scale_factor,
            parallel: parallel.clone(),
            runtime: engine.runtime.clone(),
        })
    }

    /// The transformer (with PipeFusion or tensor parallelism: the first part loaded, which
    /// knows the model's facts).
    pub fn transformer(&self) -> &dyn Backbone {
        self.transformers[0].as_ref()
    }

    /// The parts of the transformer loaded in this process, one per PipeFusion stage and
    /// tensor-parallel position, stage-major with the tp position fastest (one in all when
    /// P = T = 1, and in a process that is one rank of a launched job).
    pub fn stage_transformers(&self) -> impl Iterator<Item = &dyn Backbone> {
        self.transformers.iter().map(|t| t.as_ref())
    }

    /// The part the rank at `coords` runs: its stage's shard for its tp position.
    fn rank_transformer(&self, coords: &RankCoords) -> Result<&dyn Backbone> {
        self.positions
            .iter()
            .position(|&p| p == (coords.pp, coords.tp))
            .map(|i| self.transformers[i].as_ref())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "this process holds no transformer part for stage {} tp position {}",
                    coords.pp, coords.tp
                ))
            })
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    pub fn parallel(&self) -> &ParallelConfig {
        &self.parallel
    }

    /// Height and width must cut into whole transformer patches of the latent.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale_factor * self.transformer().info().patch_size
    }

    /// Checks a planned request against the model and the parallel configuration, before
    /// any work.
    pub fn check(&self, shape: &RunShape, input: &InputConfig) -> Result<()> {
        let multiple = self.size_multiple();
        if !shape.height.is_multiple_of(multiple) || !shape.width.is_multiple_of(multiple) {
            return Err(Error::invalid(format!(
                "--height {} and --width {} must be multiples of {multiple} for this model (VAE \
                 scale factor {} × patch size {})",
                shape.height,
                shape.width,
                self.vae_scale_factor,
                self.transformer().info().patch_size
            )));
        }
        if self.parallel.is_serial() {
            return Ok(());
        }
        self.check_parallel_vae(shape)?;
        let info = self.transformer().info();
        let mesh = RankMesh::new(&self.parallel)?;
        mesh.validate_for_model(info.num_attention_heads, info.num_layers, &shape.cfg)?;
        let dp = self.parallel.data_parallel_degree;
        if shape.batch < dp {
            return Err(Error::invalid(format!(
                "--data-parallel-degree {dp} needs at least {dp} images, but the request makes \
                 {} (prompts × --num-images-per-prompt)",
                shape.batch
            )));
        }
        if self.parallel.pipefusion_parallel_degree > 1 {
            // Refuses a patch count the image cannot be cut into, before any work.
            self.runtime_metadata(&mesh, shape, shape.batch, input)?;
        }
        Ok(())
    }

    /// Plans the request with `pipeline`, checks it, and runs it: in this thread when serial,
    /// else on one thread per rank. `on_step(i, n)` reports rank 0's progress.
    pub fn generate<P: DenoisingPipeline>(
        &self,
        pipeline: &P,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput> {
        let (shape, plan) = pipeline.plan(input)?;
        self.check(&shape, input)?;
        if self.parallel.is_serial() {
            return match self.run_rank(pipeline, &shape, &plan, input, None, on_step)? {
                Some((_, output)) => Ok(output),
                None => Err(Error::invalid("the serial run produced no output")),
            };
        }
        self.generate_parallel(pipeline, &shape, &plan, input, on_step)
    }

    /// The rows of the batch data-parallel group `index` of `degree` works on: contiguous,
    /// the first `batch % degree` groups one row more.
    fn dp_slice(batch: usize, index: usize, degree: usize) -> BatchSlice {
        let (per, extra) = (batch / degree, batch % degree);
        BatchSlice {
            start: index * per + index.min(extra),
            len: per + usize::from(index < extra),
        }
    }

    /// Everything one rank does for a request (`rank` is None in a serial run): prepare the
    /// job of the whole request (so every data-parallel slice sees exactly the serial
    /// inputs), denoise its slice, and, on the rank that leads its data-parallel group,
    /// decode. Returns the group's output on that rank only.
    fn run_rank<P: DenoisingPipeline>(
        &self,
        pipeline: &P,
        shape: &RunShape,
        plan: &P::Plan,
        input: &InputConfig,
        rank: Option<&RankContext>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Option<(usize, PipelineOutput)>> {
        let DenoiseJob {
            latents,
            guidance,
            scheduler,
            mut generator,
        } = pipeline.prepare(plan, input)?;
        if guidance.uses_cfg() != shape.cfg.is_on() {
            return Err(Error::invalid(format!(
                "the pipeline planned classifier-free guidance {} but prepared {} negative side",
                if shape.cfg.is_on() { "on" } else { "off" },
                if guidance.uses_cfg() { "a" } else { "no" }
            )));
        }
        // One row of the initial latents: the shape, dtype and device of the final ones.
        let latent_like = latents.narrow(0, 0, 1)?;
        let coords = rank.map(RankContext::coords);
        let (dp_index, slice) = match coords {
            Some(c) => (
                c.dp,
                Self::dp_slice(shape.batch, c.dp, self.parallel.data_parallel_degree),
            ),
            None => (
                0,
                BatchSlice {
                    start: 0,
                    len: shape.batch,
                },
            ),
        };
        let (latents, guidance) = if slice.len == shape.batch {
            (latents, guidance)
        } else {
            (
                latents.narrow(0, slice.start, slice.len)?,
                guidance.narrow_batch(slice.start, slice.len)?,
            )
        };
        let cfg_group = rank.map(RankContext::cfg_group).filter(|g| g.size() > 1);
        let failure = self.runtime.inject_failure;
        let this_rank = rank.map_or(0, RankContext::rank);
        let mut report = |i: usize, total: usize| -> Result<()> {
            on_step(i, total);
            if failure == Some((this_rank, i)) {
                return Err(Error::invalid(format!(
                    "injected failure on rank {this_rank} after step {i} (RuntimeConfig::inject_failure)"
                )));
            }
            Ok(())
        };
        let pp = self.parallel.pipefusion_parallel_degree;
        let mut cache = match &self.runtime.step_cache {
            None => None,
            Some(cache) if pp > 1 => {
                return Err(Error::Unsupported(format!(
                    "{} with --pipefusion-parallel-degree > 1: the cached blocks run on \
                     different stages, on patches with stale activations, so no stage can \
                     decide for the whole image; use the cache with data, CFG, Ulysses or Ring \
                     parallelism",
                    cache.kind.flag()
                )))
            }
            Some(cache) => {
                let groups: Vec<&ProcessGroup> = rank
                    .map(|r| vec![r.sp_group(), r.cfg_group(), r.tp_group()])
                    .unwrap_or_default();
                Some(step_cacher(cache, &groups)?)
            }
        };
        let latents = match rank {
            Some(rank) if pp > 1 => {
                let metadata = self.runtime_metadata(rank.mesh(), shape, slice.len, input)?;
                let config = PipeFusionConfig {
                    backbone: self.rank_transformer(&rank.coords())?,
                    scheduler: scheduler.as_ref(),
                    rank,
                    metadata: &metadata,
                    warmup_steps: self.parallel.warmup_steps,
                    zero_stale_kv: self.runtime.pipefusion_zero_stale_kv,
                };
                denoise_pipefusion(
                    &config,
                    latents,
                    &guidance,
                    Some(&mut generator),
                    &mut report,
                )?
            }
            _ => {
                let (ctx, backbone) = match rank {
                    Some(rank) => (
                        self.forward_context(rank, shape, slice.len, input)?,
                        self.rank_transformer(&rank.coords())?,
                    ),
                    None => (ForwardContext::default(), self.transformer()),
                };
                Some(denoise_with_cache(
                    backbone,
                    scheduler.as_ref(),
                    latents,
                    &guidance,
                    &ctx,
                    cfg_group,
                    Some(&mut generator),
                    cache.as_mut().map(|c| &mut **c as &mut dyn StepCacher),
                    &mut report,
                )?)
            }
        };

        // The output lives on the last pipeline stage (the only one with PipeFusion).
        let leads_group =
            coords.is_none_or(|c| c.cfg == 0 && c.sp == 0 && c.pp + 1 == pp && c.tp == 0);
        if let Some(rank) = rank.filter(|_| self.decodes_on_every_rank(input)) {
            let cache_stats = cache.as_ref().map(|c| c.stats());
            let latents = latents.filter(|_| leads_group);
            let decode = ParallelDecode {
                pipeline,
                plan,
                shape,
                rank,
                like: latent_like,
            };
            return decode.run(latents, cache_stats);
        }
        let (true, Some(latents)) = (leads_group, latents) else {
            return Ok(None);
        };
        let images = match input.output_type {
            OutputType::Latent => Vec::new(),
            OutputType::Pil => pipeline.decode(plan, &latents)?,
        };
        Ok(Some((
            dp_index,
            PipelineOutput {
                latents,
                images,
                comm_stats: None,
                cache_stats: cache.as_ref().map(|c| c.stats()),
            },
        )))
    }

    /// The runtime state's metadata of this request's shape on `mesh` for `batch` rows: the
    /// sp split and the PipeFusion patches.
    fn runtime_metadata(
        &self,
        mesh: &RankMesh,
        shape: &RunShape,
        batch: usize,
        input: &InputConfig,
    ) -> Result<InputMetadata> {
        let mut state = RuntimeState::new(
            mesh,
            self.transformer().info().patch_size,
            self.vae_scale_factor,
            self.parallel.num_pipeline_patch,
        );
        Ok(state
            .set_input_parameters(shape.height, shape.width, batch, input.num_inference_steps)?
            .clone())
    }

    /// The forward context of `rank` for this request's shape: sequence parallel when the sp
    /// degree is above 1, with the rank's tp group when the tp degree is.
    fn forward_context(
        &self,
        rank: &RankContext,
        shape: &RunShape,
        batch: usize,
        input: &InputConfig,
    ) -> Result<ForwardContext> {
        let tp = Some(rank.tp_group().clone());
        if rank.mesh().degree(Axis::Sp) == 1 {
            return Ok(ForwardContext::default().with_tp(tp));
        }
        let mut state = RuntimeState::new(
            rank.mesh(),
            self.transformer().info().patch_size,
            self.vae_scale_factor,
            None,
        );
        let metadata = state.set_input_parameters(
            shape.height,
            shape.width,
            batch,
            input.num_inference_steps,
        )?;
        let sp = SpContext::from_rank(rank, metadata.full.clone())?;
        let method = sp.method_name();
        Ok(ForwardContext::sequence_parallel(method, sp)?.with_tp(tp))
    }

    /// Runs every rank of the parallel configuration as a thread (or, in a process that is one
    /// rank of a launched job, this process's rank), forwards rank 0's progress to `on_step`,
    /// and joins the data-parallel groups' outputs in order.
    fn generate_parallel<P: DenoisingPipeline>(
        &self,
        pipeline: &P,
        shape: &RunShape,
        plan: &P::Plan,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput> {
        let mesh = RankMesh::new(&self.parallel)?;
        if let Some(world) = process_world() {
            return self.generate_in_process(world, &mesh, pipeline, shape, plan, input, on_step);
        }
        let options = LaunchOptions::with_timeout(self.runtime.comm_timeout);
        let stats = options.stats.clone();
        let (progress, steps) = std::sync::mpsc::channel::<(usize, usize)>();
        let outcome = std::thread::scope(|scope| {
            let runner = scope.spawn(move || {
                launch_local(&mesh, &options, |rank| {
                    let progress = progress.clone();
                    let mut report = |i, n| {
                        if rank.rank() == 0 {
                            // The receiver outlives the run; a send cannot fail before then.
                            let _ = progress.send((i, n));
                        }
                    };
                    self.run_rank(pipeline, shape, plan, input, Some(&rank), &mut report)
                })
            });
            // Ends when the runner drops the last sender, i.e. when every rank is done.
            for (i, n) in steps {
                on_step(i, n);
            }
            runner.join()
        });
        let ranks = outcome
            .map_err(|_| Error::invalid("the parallel run's launcher thread panicked"))??;
        let mut groups: Vec<(usize, PipelineOutput)> = ranks.into_iter().flatten().collect();
        groups.sort_by_key(|(dp, _)| *dp);
        let latents: Vec<Tensor> = groups.iter().map(|(_, o)| o.latents.clone()).collect();
        let cache_stats = groups.first().and_then(|(_, o)| o.cache_stats);
        let images = groups.into_iter().flat_map(|(_, o)| o.images).collect();
        Ok(PipelineOutput {
            latents: Tensor::cat(&latents, 0)?,
            images,
            comm_stats: Some(stats),
            cache_stats,
        })
    }
}

impl DiTRuntime {
    /// Runs this process's rank of a launched job (one process per rank): its share of the
    /// work as a thread rank would do it, then the data-parallel groups' outputs travel to
    /// world rank 0, which returns the whole request's output. Every other process returns an
    /// empty output (no latents rows, no images): only rank 0 reports and writes.
    #[allow(clippy::too_many_arguments)]
    fn generate_in_process<P: DenoisingPipeline>(
        &self,
        world: &dyn ProcessWorld,
        mesh: &RankMesh,
        pipeline: &P,
        shape: &RunShape,
        plan: &P::Plan,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput> {
        let stats = CommStats::new();
        let rank = world.rank_context(mesh, &stats, self.runtime.comm_timeout)?;
        let mut output =
            self.run_process_rank(&rank, &stats, mesh, pipeline, shape, plan, input, on_step)?;
        // Each process counted only its own rank; every counter goes to every process, so
        // rank 0 reports the whole job's traffic, as a thread run does.
        output.comm_stats = Some(stats.gathered(rank.world())?);
        Ok(output)
    }

    /// [`Self::generate_in_process`] once the rank's groups exist.
    #[allow(clippy::too_many_arguments)]
    fn run_process_rank<P: DenoisingPipeline>(
        &self,
        rank: &RankContext,
        stats: &CommStats,
        mesh: &RankMesh,
        pipeline: &P,
        shape: &RunShape,
        plan: &P::Plan,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput> {
        let stats = stats.clone();
        let mut report = |i, n| {
            if rank.rank() == 0 {
                on_step(i, n);
            }
        };
        let own = self.run_rank(pipeline, shape, plan, input, Some(rank), &mut report)?;
        if self.decodes_on_every_rank(input) {
            // The decode already gathered the whole request's latents on every rank and
            // joined the images on rank 0.
            return match own {
                Some((_, mut output)) => {
                    output.comm_stats = Some(stats);
                    Ok(output)
                }
                None => empty_output(stats),
            };
        }
        let world_group = rank.world();
        let dp = self.parallel.data_parallel_degree;
        if rank.rank() != 0 {
            if let Some((_, output)) = own {
                // A data-parallel group's lead sends its latents, then its images as one
                // (n, h, w, 3) u8 tensor (none when latents were asked for).
                world_group.send(&output.latents, 0)?;
                world_group.send(&images_tensor(&output.images)?, 0)?;
            }
            world_group.barrier()?;
            return empty_output(stats);
        }
        let mut latents = Vec::with_capacity(dp);
        let mut images = Vec::new();
        let mut cache_stats = None;
        for group in 0..dp {
            let lead = dp_lead(mesh, group)?;
            if lead == 0 {
                let Some((_, output)) = &own else {
                    return Err(Error::invalid(
                        "rank 0 leads a data-parallel group but has no output",
                    ));
                };
                latents.push(output.latents.clone());
                images.extend(output.images.iter().cloned());
                cache_stats = output.cache_stats;
            } else {
                let index = world_group.index_of(lead).ok_or_else(|| {
                    Error::invalid(format!("rank {lead} is not in the world group"))
                })?;
                latents.push(world_group.recv(index)?);
                images.extend(tensor_images(&world_group.recv(index)?)?);
            }
        }
        world_group.barrier()?;
        Ok(PipelineOutput {
            latents: Tensor::cat(&latents, 0)?,
            images,
            comm_stats: Some(stats),
            cache_stats,
        })
    }
}

/// The rank that holds data-parallel group `dp`'s final latents: its first rank on every
/// axis but PipeFusion's, where the last stage holds them.
fn dp_lead(mesh: &RankMesh, dp: usize) -> Result<usize> {
    mesh.rank_of(&RankCoords {
        dp,
        cfg: 0,
        pp: mesh.degree(Axis::Pp) - 1,
        sp: 0,
        ulysses: 0,
        ring: 0,
        tp: 0,
    })
}

/// What a process other than world rank 0 returns: no latent rows, no images (rank 0 holds
/// the request's output).
fn empty_output(stats: CommStats) -> Result<PipelineOutput> {
    Ok(PipelineOutput {
        latents: Tensor::zeros(0, candle_core::DType::F32, &candle_core::Device::Cpu)?,
        images: Vec::new(),
        comm_stats: Some(stats),
        cache_stats: None,
    })
}

/// Images as one (n, h, w, 3) u8 tensor, to cross between processes; (0, 0, 0, 3) for none.
fn images_tensor(images: &[RgbImage]) -> Result<Tensor> {
    let (h, w) = images.first().map_or((0, 0), |i| (i.height, i.width));
    let mut data = Vec::with_capacity(images.len() * h * w * 3);
    for image in images {
        if (image.height, image.width) != (h, w) {
            return Err(Error::invalid("the images of one request differ in size"));
        }
        data.extend_from_slice(&image.data);
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), h, w, 3),
        &candle_core::Device::Cpu,
    )?)
}

fn tensor_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, h, w, _) = t.dims4()?;
    if n * h * w == 0 {
        return Ok(Vec::new());
    }
    let data = t.flatten_all()?.to_vec1::<u8>()?;
    Ok(data
        .chunks(h * w * 3)
        .take(n)
        .map(|c| RgbImage {
            width: w,
            height: h,
            data: c.to_vec(),
        })
        .collect())
}

impl DiTRuntime {
    /// Whether the ranks of a parallel run decode together (`--use-parallel-vae`, images
    /// wanted).
    fn decodes_on_every_rank(&self, input: &InputConfig) -> bool {
        self.runtime.use_parallel_vae && input.output_type == OutputType::Pil
    }

    /// `--use-parallel-vae` splits the latent image's rows over every rank: refuses a world
    /// larger than the rows, before any work.
    fn check_parallel_vae(&self, shape: &RunShape) -> Result<()> {
        let world = self.parallel.world_size();
        let rows = shape.height / self.vae_scale_factor;
        if self.runtime.use_parallel_vae && world > rows {
            return Err(Error::invalid(format!(
                "--use-parallel-vae on {world} ranks: the latent image has {rows} rows \
                 (height {} / VAE scale factor {}) and each rank decodes at least one; use a \
                 larger --height or fewer ranks",
                shape.height, self.vae_scale_factor
            )));
        }
        Ok(())
    }
}

/// `--use-parallel-vae` on one rank: the final latents of every data-parallel group are
/// gathered to every rank, then the whole batch is decoded with the rows split over the world;
/// world rank 0 returns the output of the whole request (as data-parallel group 0, so
/// [`DiTRuntime::generate_parallel`] joins it unchanged).
struct ParallelDecode<'a, P: DenoisingPipeline> {
    pipeline: &'a P,
    plan: &'a P::Plan,
    shape: &'a RunShape,
    rank: &'a RankContext,
    /// One row of latents of the final latents' shape, dtype and device.
    like: Tensor,
}

impl<P: DenoisingPipeline> ParallelDecode<'_, P> {
    /// `latents`: this rank's data-parallel group's final latents where this rank leads the
    /// group, else None.
    fn run(
        &self,
        latents: Option<Tensor>,
        cache_stats: Option<CacheStats>,
    ) -> Result<Option<(usize, PipelineOutput)>> {
        let world = self.rank.world();
        let latents = self.gather_latents(latents)?;
        let images = self.pipeline.decode_parallel(self.plan, &latents, world)?;
        if world.index() != 0 {
            return Ok(None);
        }
        Ok(Some((
            0,
            PipelineOutput {
                latents,
                images,
                comm_stats: None,
                cache_stats,
            },
        )))
    }

    /// The whole request's final latents on every rank: each group's lead contributes its
    /// rows (padded to the longest data-parallel slice so that the all-gather moves equal
    /// shapes), every other rank zeros; the leads' rows are kept, in data-parallel order.
    fn gather_latents(&self, latents: Option<Tensor>) -> Result<Tensor> {
        let mesh = self.rank.mesh();
        let dp = mesh.degree(Axis::Dp);
        let longest = DiTRuntime::dp_slice(self.shape.batch, 0, dp).len;
        let mine = match latents {
            Some(l) => {
                let rows = l.dim(0)?;
                l.pad_with_zeros(0, 0, longest - rows)?
            }
            None => self.like.zeros_like()?.repeat((longest, 1, 1, 1))?,
        };
        let parts = self.rank.world().all_gather_tensors(&mine)?;
        let mut rows = Vec::with_capacity(dp);
        for d in 0..dp {
            let lead = dp_lead(mesh, d)?;
            let len = DiTRuntime::dp_slice(self.shape.batch, d, dp).len;
            rows.push(parts[lead].narrow(0, 0, len)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

/// The registered transformers that support tensor parallelism, for the refusal message.
fn tensor_parallel_models() -> String {
    let names: Vec<&str> = xfuser_core::inventory::iter::<xfuser_core::registry::TransformerEntry>
        .into_iter()
        .filter(|e| e.tensor_parallel)
        .map(|e| e.class_name)
        .collect();
    match names.is_empty() {
        true => "no registered model".into(),
        false => names.join(", "),
    }
}

/// Initial noise of `shape` drawn from `generator` (diffusers' `randn_tensor` on the CPU), or
/// the latents the request gave, checked against the shape.
pub fn initial_latents(
    input: &InputConfig,
    shape: (usize, usize, usize, usize),
    generator: &mut Generator,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let dims = [shape.0, shape.1, shape.2, shape.3];
    match &input.latents {
        Some(latents) => {
            if latents.dims() != dims {
                return Err(Error::invalid(format!(
                    "given latents have shape {:?}, expected {:?}",
                    latents.dims(),
                    shape
                )));
            }
            Ok(latents.to_device(device)?)
        }
        None => generator.randn_tensor(&dims, device),
    }
}

/// The text sides of a request: `encode` of the prompts and, with classifier-free guidance,
/// of the negative prompt repeated for every prompt (diffusers' batch of negatives).
pub fn encode_sides<T>(
    input: &InputConfig,
    cfg: bool,
    encode: impl Fn(&[String]) -> Result<T>,
) -> Result<(T, Option<T>)> {
    let positive = encode(&input.prompts)?;
    let negative = if cfg {
        let negatives = vec![input.negative_prompt.clone(); input.prompts.len()];
        Some(encode(&negatives)?)
    } else {
        None
    };
    Ok((positive, negative))
}
