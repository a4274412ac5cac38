//! PixArt-α (`PixArtAlphaPipeline`), and the implementation PixArt-Σ shares
//! (`pipeline_pixart_sigma.rs` only differs in its defaults). As diffusers' pipeline: T5 text
//! encoding with attention masks, classifier-free guidance, the scheduler's denoising loop,
//! optional aspect-ratio binning, VAE decode.
//!
//! `clean_caption` (diffusers' default, which needs bs4 and ftfy) is not implemented: prompts
//! are lowercased and stripped, which is what diffusers does with `clean_caption=False`.
//!
//! Parallel runs put every rank on a thread (see [`PixArtPipeline::generate`]); with
//! PipeFusion (`pipefusion_parallel_degree` P > 1) the transformer is loaded once per stage,
//! each holding only its blocks, and the ranks of stage s run with stage s's part.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xfuser_core::backbone::{Backbone, ForwardContext, PipelineStage, SpContext};
use xfuser_core::distributed::{
    launch_local, Axis, InputMetadata, LaunchOptions, RankContext, RankMesh, RuntimeState,
};
use xfuser_core::engine::{
    EngineConfig, InputConfig, OutputType, ParallelConfig, PipelineOutput, RuntimeConfig,
};
use xfuser_core::pipeline::DiffusionPipeline;
use xfuser_core::random::Generator;
use xfuser_core::registry::{load_scheduler, load_transformer, LoadOptions, PipelineEntry};
use xfuser_core::{Error, Result};

use crate::binning::{classify_height_width_bin, resize_and_crop_tensor, AspectRatioBin};
use crate::denoise::{denoise, Guidance, TextConditioning};
use crate::image::{postprocess_u8, u8_to_rgb};
use crate::pipefusion::{denoise_pipefusion, PipeFusionConfig};
use crate::text::t5::T5EncoderModel;
use crate::text::tokenizer::T5Tokenizer;
use crate::vae::AutoencoderKL;

/// What distinguishes the members of the PixArt family.
#[derive(Debug)]
pub struct PixArtSpec {
    pub class_name: &'static str,
    pub default_max_sequence_length: usize,
    /// The aspect-ratio table for a transformer `sample_size`.
    pub bins: fn(usize) -> Result<&'static [AspectRatioBin]>,
    /// Whether the pipeline passes resolution / aspect-ratio conditioning to a transformer
    /// with sample_size 128 (PixArt-α does; PixArt-Σ never does).
    pub micro_conditioning: bool,
}

pub static PIXART_ALPHA: PixArtSpec = PixArtSpec {
    class_name: "PixArtAlphaPipeline",
    default_max_sequence_length: 120,
    bins: crate::binning::pixart_alpha_bins,
    micro_conditioning: true,
};

/// A loaded PixArt pipeline.
pub struct PixArtPipeline {
    spec: &'static PixArtSpec,
    tokenizer: T5Tokenizer,
    text_encoder: T5EncoderModel,
    /// The whole transformer, or with PipeFusion one part per stage, in stage order.
    transformers: Vec<Box<dyn Backbone>>,
    scheduler_file: PathBuf,
    vae: AutoencoderKL,
    device: Device,
    parallel: ParallelConfig,
    runtime: RuntimeConfig,
}

/// What one generation request resolves to before any rank starts.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The size generated at (after binning) and the size asked for.
    height: usize,
    width: usize,
    requested_height: usize,
    requested_width: usize,
    max_sequence_length: usize,
    /// Images in the whole request: prompts × num_images_per_prompt.
    batch: usize,
}

/// A rank's share of the request's batch: rows `start..start + len`.
#[derive(Debug, Clone, Copy)]
struct BatchSlice {
    start: usize,
    len: usize,
}

/// The PixArt-α pipeline, named as xDiT's.
#[allow(non_camel_case_types)]
pub type xFuserPixArtAlphaPipeline = PixArtPipeline;

impl PixArtPipeline {
    /// Loads every component of the diffusers folder `dir` (tokenizer, text_encoder,
    /// transformer, scheduler, vae).
    pub fn load(spec: &'static PixArtSpec, dir: &Path, engine: &EngineConfig) -> Result<Self> {
        engine.parallel.validate()?;
        let index = dir.join("model_index.json");
        let components = xfuser_core::config::read_json_value(&index)?;
        for name in [
            "tokenizer",
            "text_encoder",
            "transformer",
            "scheduler",
            "vae",
        ] {
            if components.get(name).is_none() {
                return Err(Error::Config {
                    file: index.clone(),
                    field: name.into(),
                    message: format!("missing component `{name}` required by {}", spec.class_name),
                });
            }
        }
        check_degrees_against_config(&dir.join("transformer/config.json"), &engine.parallel)?;
        let (dtype, device) = (engine.model.dtype, engine.model.device.clone());
        let options = LoadOptions {
            dtype,
            device: device.clone(),
            stage: None,
        };
        let pp = engine.parallel.pipefusion_parallel_degree;
        let transformers = if pp > 1 {
            (0..pp)
                .map(|index| {
                    let stage = PipelineStage {
                        index,
                        num_stages: pp,
                        layer_counts: engine.parallel.attn_layer_num_for_pp.clone(),
                    };
                    let options = LoadOptions {
                        stage: Some(stage),
                        ..options.clone()
                    };
                    load_transformer(&dir.join("transformer"), &options)
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![load_transformer(&dir.join("transformer"), &options)?]
        };
        let scheduler_file = dir.join("scheduler/scheduler_config.json");
        // Parse it now so a bad scheduler config fails at load time, not mid-generation.
        load_scheduler(&scheduler_file)?;
        Ok(Self {
            spec,
            tokenizer: T5Tokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: T5EncoderModel::from_dir(&dir.join("text_encoder"), dtype, &device)?,
            transformers,
            scheduler_file,
            vae: AutoencoderKL::load(&dir.join("vae"), dtype, &device)?,
            device,
            parallel: engine.parallel.clone(),
            runtime: engine.runtime.clone(),
        })
    }

    /// `PixArtAlphaPipeline.from_pretrained(model)`: a folder or a Hub id.
    pub fn from_pretrained(engine: &EngineConfig) -> Result<Self> {
        let dir = crate::hub::resolve_model(&engine.model.model)?;
        Self::load(&PIXART_ALPHA, &dir, engine)
    }

    /// The transformer (with PipeFusion: its first stage, which knows the model's facts).
    pub fn transformer(&self) -> &dyn Backbone {
        self.transformers[0].as_ref()
    }

    /// The parts of the transformer, one per PipeFusion stage (one in all when P = 1).
    pub fn stage_transformers(&self) -> impl Iterator<Item = &dyn Backbone> {
        self.transformers.iter().map(|t| t.as_ref())
    }

    fn vae_scale_factor(&self) -> usize {
        self.vae.vae_scale_factor()
    }

    /// diffusers' `encode_prompt`: (embeds (B·n, L, C), mask (B·n, L)) for `prompts`, each
    /// prompt's embedding repeated `num_images_per_prompt` times in a row.
    ///
    /// The mask is repeated as diffusers repeats it, the whole batch n times over
    /// (`mask.repeat(n, 1)`), which pairs embeddings and masks differently when there are
    /// several prompts and several images per prompt; kept so results stay identical.
    pub fn encode_prompt(
        &self,
        prompts: &[String],
        num_images_per_prompt: usize,
        max_sequence_length: usize,
    ) -> Result<TextConditioning> {
        let texts: Vec<String> = prompts.iter().map(|p| preprocess_text(p)).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens = self
            .tokenizer
            .encode_batch(&refs, max_sequence_length, &self.device)?;
        let mask = tokens.attention_mask.to_dtype(DType::I64)?;
        let embeds = self
            .text_encoder
            .forward(&tokens.input_ids, Some(&tokens.attention_mask))?;
        let n = num_images_per_prompt;
        let (b, l, c) = embeds.dims3()?;
        // (B, L, C) -> (B, n·L, C) -> (B·n, L, C): each prompt n times in a row.
        let embeds = embeds.repeat((1, n, 1))?.reshape((b * n, l, c))?;
        // (B, L) -> (n·B, L): the whole batch n times.
        let mask = mask.repeat((n, 1))?;
        Ok(TextConditioning { embeds, mask })
    }

    /// The size generated at: the request (or the model's default), moved to the nearest
    /// trained aspect-ratio bin when binning is on. Returns (generated, requested).
    fn generation_size(&self, input: &InputConfig) -> Result<((usize, usize), (usize, usize))> {
        let info = self.transformer().info();
        let default = info.sample_size * self.vae_scale_factor();
        let requested = (
            input.height.unwrap_or(default),
            input.width.unwrap_or(default),
        );
        if !input.use_resolution_binning {
            return Ok((requested, requested));
        }
        let bins = (self.spec.bins)(info.sample_size).map_err(|e| {
            Error::invalid(format!(
                "{e}; resolution binning is not defined for this model's sample_size {}: \
                 pass --no-use-resolution-binning",
                info.sample_size
            ))
        })?;
        let binned = classify_height_width_bin(requested.0, requested.1, bins)?;
        Ok((binned, requested))
    }

    fn initial_latents(
        &self,
        input: &InputConfig,
        shape: (usize, usize, usize, usize),
        generator: &mut Generator,
    ) -> Result<Tensor> {
        match &input.latents {
            Some(latents) => {
                if latents.dims() != [shape.0, shape.1, shape.2, shape.3] {
                    return Err(Error::invalid(format!(
                        "given latents have shape {:?}, expected {:?}",
                        latents.dims(),
                        shape
                    )));
                }
                Ok(latents.to_device(&self.device)?)
            }
            None => {
                let dims = [shape.0, shape.1, shape.2, shape.3];
                generator.randn_tensor(&dims, &self.device)
            }
        }
    }

    /// PixArt-α's micro-conditioning for sample_size 128: (B, 2) [height, width] and (B, 1)
    /// height / width.
    fn micro_conditions(
        &self,
        batch: usize,
        height: usize,
        width: usize,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !self.spec.micro_conditioning || self.transformer().info().sample_size != 128 {
            return Ok((None, None));
        }
        let resolution =
            Tensor::new(&[[height as f32, width as f32]], &self.device)?.repeat((batch, 1))?;
        let aspect = Tensor::new(&[[(height as f64 / width as f64) as f32]], &self.device)?
            .repeat((batch, 1))?;
        Ok((Some(resolution), Some(aspect)))
    }
}

/// Refuses parallel degrees the transformer cannot split (heads for Ulysses and tensor
/// parallelism, blocks for PipeFusion) from its config alone, before any weights are read.
fn check_degrees_against_config(config: &Path, parallel: &ParallelConfig) -> Result<()> {
    if parallel.is_serial() {
        return Ok(());
    }
    let cfg: xfuser_transformers::pixart_transformer_2d::Config =
        xfuser_core::config::read_json_config(config)?;
    RankMesh::new(parallel)?.validate_for_shape(cfg.num_attention_heads, cfg.num_layers)
}

/// `_text_preprocessing` with `clean_caption=False`: lowercase, strip surrounding whitespace.
fn preprocess_text(text: &str) -> String {
    text.to_lowercase().trim().to_string()
}

impl PixArtPipeline {
    /// Validates the request against the model and the parallel configuration and fixes its
    /// sizes, before any work.
    fn plan(&self, input: &InputConfig) -> Result<Plan> {
        input.validate(self.vae_scale_factor())?;
        let ((height, width), (requested_height, requested_width)) = self.generation_size(input)?;
        // The latent must cut into whole transformer patches. Binned sizes always do; a size
        // asked for without binning must be a multiple of the VAE factor times the patch size.
        let multiple = self.vae_scale_factor() * self.transformer().info().patch_size;
        if height % multiple != 0 || width % multiple != 0 {
            return Err(Error::invalid(format!(
                "--height {height} and --width {width} must be multiples of {multiple} for this \
                 model (VAE scale factor {} × patch size {}); pick such a size or leave \
                 resolution binning on",
                self.vae_scale_factor(),
                self.transformer().info().patch_size
            )));
        }
        let max_sequence_length = input
            .max_sequence_length
            .unwrap_or(self.spec.default_max_sequence_length);
        if max_sequence_length == 0 {
            return Err(Error::invalid("--max-sequence-length must be at least 1"));
        }
        let batch = input.prompts.len() * input.num_images_per_prompt;
        if !self.parallel.is_serial() {
            let info = self.transformer().info();
            let mesh = RankMesh::new(&self.parallel)?;
            mesh.validate_for_model(
                info.num_attention_heads,
                info.num_layers,
                input.guidance_scale,
            )?;
            let dp = self.parallel.data_parallel_degree;
            if batch < dp {
                return Err(Error::invalid(format!(
                    "--data-parallel-degree {dp} needs at least {dp} images, but the request \
                     makes {batch} (prompts × --num-images-per-prompt)"
                )));
            }
            if self.parallel.pipefusion_parallel_degree > 1 {
                // Refuses a patch count the image cannot be cut into, before any work.
                self.runtime_metadata(&mesh, height, width, batch, input)?;
            }
        }
        Ok(Plan {
            height,
            width,
            requested_height,
            requested_width,
            max_sequence_length,
            batch,
        })
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

    /// Everything one rank does for a request (`rank` is None in a serial run): encode the
    /// text and draw the noise of the whole request (so every data-parallel slice sees
    /// exactly the serial inputs), denoise its slice, and, on the rank that leads its
    /// data-parallel group, decode. Returns the group's output on that rank only.
    fn run_rank(
        &self,
        plan: &Plan,
        input: &InputConfig,
        rank: Option<&RankContext>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Option<(usize, PipelineOutput)>> {
        let info = self.transformer().info().clone();
        let scale = self.vae_scale_factor();
        let n = input.num_images_per_prompt;
        let positive = self.encode_prompt(&input.prompts, n, plan.max_sequence_length)?;
        let negative = if input.uses_cfg() {
            let negatives = vec![input.negative_prompt.clone(); input.prompts.len()];
            Some(self.encode_prompt(&negatives, n, plan.max_sequence_length)?)
        } else {
            None
        };

        let mut scheduler = load_scheduler(&self.scheduler_file)?;
        scheduler.set_timesteps(input.num_inference_steps)?;
        let mut generator = Generator::manual_seed(input.seed);
        let shape = (
            plan.batch,
            info.in_channels,
            plan.height / scale,
            plan.width / scale,
        );
        let latents = self.initial_latents(input, shape, &mut generator)?;
        let latents = (latents * scheduler.init_noise_sigma())?;
        let (resolution, aspect_ratio) =
            self.micro_conditions(plan.batch, plan.height, plan.width)?;
        let guidance = Guidance {
            positive,
            negative,
            guidance_scale: input.guidance_scale,
            resolution,
            aspect_ratio,
        };

        let coords = rank.map(RankContext::coords);
        let (dp_index, slice) = match coords {
            Some(c) => (
                c.dp,
                Self::dp_slice(plan.batch, c.dp, self.parallel.data_parallel_degree),
            ),
            None => (
                0,
                BatchSlice {
                    start: 0,
                    len: plan.batch,
                },
            ),
        };
        let (latents, guidance) = if slice.len == plan.batch {
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
        let latents = match rank {
            Some(rank) if pp > 1 => {
                let metadata =
                    self.runtime_metadata(rank.mesh(), plan.height, plan.width, slice.len, input)?;
                let config = PipeFusionConfig {
                    backbone: self.transformers[rank.coords().pp].as_ref(),
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
                let ctx = match rank {
                    Some(rank) => self.forward_context(rank, plan, slice.len, input)?,
                    None => ForwardContext::default(),
                };
                Some(denoise(
                    self.transformer(),
                    scheduler.as_ref(),
                    latents,
                    &guidance,
                    &ctx,
                    cfg_group,
                    Some(&mut generator),
                    &mut report,
                )?)
            }
        };

        // The output lives on the last pipeline stage (the only one with PipeFusion).
        let leads_group =
            coords.is_none_or(|c| c.cfg == 0 && c.sp == 0 && c.pp + 1 == pp && c.tp == 0);
        let (true, Some(latents)) = (leads_group, latents) else {
            return Ok(None);
        };
        let images = match input.output_type {
            OutputType::Latent => Vec::new(),
            OutputType::Pil => self.decode(plan, &latents)?,
        };
        Ok(Some((
            dp_index,
            PipelineOutput {
                latents,
                images,
                comm_stats: None,
            },
        )))
    }

    /// The runtime state's metadata of this request's shape on `mesh`: the sp split and the
    /// PipeFusion patches.
    fn runtime_metadata(
        &self,
        mesh: &RankMesh,
        height: usize,
        width: usize,
        batch: usize,
        input: &InputConfig,
    ) -> Result<InputMetadata> {
        let mut state = RuntimeState::new(
            mesh,
            self.transformer().info().patch_size,
            self.parallel.num_pipeline_patch,
        );
        Ok(state
            .set_input_parameters(height, width, batch, input.num_inference_steps)?
            .clone())
    }

    /// The sequence-parallel forward context of `rank` for this request's shape, or the
    /// serial one when the sp degree is 1.
    fn forward_context(
        &self,
        rank: &RankContext,
        plan: &Plan,
        batch: usize,
        input: &InputConfig,
    ) -> Result<ForwardContext> {
        if rank.mesh().degree(Axis::Sp) == 1 {
            return Ok(ForwardContext::default());
        }
        let mut state = RuntimeState::new(rank.mesh(), self.transformer().info().patch_size, None);
        let metadata = state.set_input_parameters(
            plan.height,
            plan.width,
            batch,
            input.num_inference_steps,
        )?;
        let sp = SpContext::from_rank(rank, metadata.full.clone())?;
        let method = sp.method_name();
        ForwardContext::sequence_parallel(method, sp)
    }

    /// VAE decode, resize-and-crop back to the requested size after binning, to 8-bit RGB.
    fn decode(&self, plan: &Plan, latents: &Tensor) -> Result<Vec<xfuser_core::engine::RgbImage>> {
        let mut images = self.vae.decode_latents(latents)?;
        if (plan.height, plan.width) != (plan.requested_height, plan.requested_width) {
            images = resize_and_crop_tensor(&images, plan.requested_width, plan.requested_height)?;
        }
        u8_to_rgb(&postprocess_u8(&images)?)
    }

    /// Runs every rank of the parallel configuration as a thread, forwards rank 0's progress
    /// to `on_step`, and joins the data-parallel groups' outputs in order.
    fn generate_parallel(
        &self,
        plan: &Plan,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput> {
        let mesh = RankMesh::new(&self.parallel)?;
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
                    self.run_rank(plan, input, Some(&rank), &mut report)
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
        let images = groups.into_iter().flat_map(|(_, o)| o.images).collect();
        Ok(PipelineOutput {
            latents: Tensor::cat(&latents, 0)?,
            images,
            comm_stats: Some(stats),
        })
    }
}

impl DiffusionPipeline for PixArtPipeline {
    fn class_name(&self) -> &'static str {
        self.spec.class_name
    }

    fn generate(
        &self,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput> {
        let plan = self.plan(input)?;
        if self.parallel.is_serial() {
            return match self.run_rank(&plan, input, None, on_step)? {
                Some((_, output)) => Ok(output),
                None => Err(Error::invalid("the serial run produced no output")),
            };
        }
        self.generate_parallel(&plan, input, on_step)
    }
}

fn load_alpha(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
    Ok(Box::new(PixArtPipeline::load(&PIXART_ALPHA, dir, engine)?))
}

xfuser_core::inventory::submit! {
    PipelineEntry { class_name: "PixArtAlphaPipeline", load: load_alpha }
}
