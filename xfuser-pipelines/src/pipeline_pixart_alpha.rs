//! PixArt-α (`PixArtAlphaPipeline`), and the implementation PixArt-Σ shares
//! (`pipeline_pixart_sigma.rs` only differs in its defaults). As diffusers' pipeline: T5 text
//! encoding with attention masks, classifier-free guidance, the scheduler's denoising loop,
//! optional aspect-ratio binning, VAE decode.
//!
//! `clean_caption` (diffusers' default, which needs bs4 and ftfy) is not implemented: prompts
//! are lowercased and stripped, which is what diffusers does with `clean_caption=False`.
//!
//! Everything parallel is the runtime's ([`crate::runtime`]): this file says how a request
//! becomes a denoising job (T5 text, micro-conditioning, noise, scheduler) and how latents
//! become images.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xfuser_core::backbone::{names, Backbone, Conditioning};
use xfuser_core::distributed::{CfgUse, ProcessGroup};
use xfuser_core::engine::{EngineConfig, InputConfig, PipelineOutput, RgbImage};
use xfuser_core::pipeline::DiffusionPipeline;
use xfuser_core::random::Generator;
use xfuser_core::registry::{load_scheduler, PipelineEntry};
use xfuser_core::{Error, Result};

use crate::binning::{classify_height_width_bin, resize_and_crop_tensor, AspectRatioBin};
use crate::denoise::Guidance;
use crate::image::{postprocess_u8, u8_to_rgb};
use crate::pipeline_utils::read_model_index;
use crate::runtime::{
    encode_sides, initial_latents, DenoiseJob, DenoisingPipeline, DiTRuntime, RunShape,
};
use crate::text::t5::T5EncoderModel;
use crate::text::tokenizer::T5Tokenizer;
use crate::vae::{AutoencoderKL, VaeConfig};
use xfuser_transformers::pixart_transformer_2d::{ASPECT_RATIO, RESOLUTION};

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
    runtime: DiTRuntime,
    scheduler_file: PathBuf,
    vae: AutoencoderKL,
    device: Device,
}

/// What one generation request resolves to before any rank starts.
#[derive(Debug, Clone, Copy)]
pub struct PixArtPlan {
    /// The size generated at (after binning) and the size asked for.
    height: usize,
    width: usize,
    requested_height: usize,
    requested_width: usize,
    max_sequence_length: usize,
    /// Images in the whole request: prompts × num_images_per_prompt.
    batch: usize,
    cfg: bool,
}

/// The text side of one half of classifier-free guidance.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// (B, L, caption_channels)
    pub embeds: Tensor,
    /// (B, L), 1 for tokens attended to.
    pub mask: Tensor,
}

/// The PixArt-α pipeline, named as xDiT's.
#[allow(non_camel_case_types)]
pub type xFuserPixArtAlphaPipeline = PixArtPipeline;

impl PixArtPipeline {
    /// Loads every component of the diffusers folder `dir` (tokenizer, text_encoder,
    /// transformer, scheduler, vae).
    pub fn load(spec: &'static PixArtSpec, dir: &Path, engine: &EngineConfig) -> Result<Self> {
        read_model_index(
            dir,
            spec.class_name,
            &[
                "tokenizer",
                "text_encoder",
                "transformer",
                "scheduler",
                "vae",
            ],
        )?;
        let (dtype, device) = (engine.model.dtype, engine.model.device.clone());
        // The degrees are checked against the configs before any weights are read.
        let vae_scale_factor = VaeConfig::load(&dir.join("vae/config.json"))?.vae_scale_factor();
        let runtime = DiTRuntime::load(
            &dir.join("transformer"),
            spec.class_name,
            &[xfuser_transformers::pixart_transformer_2d::CLASS_NAME],
            vae_scale_factor,
            engine,
        )?;
        let vae = AutoencoderKL::load(&dir.join("vae"), dtype, &device)?;
        let scheduler_file = dir.join("scheduler/scheduler_config.json");
        // Parse it now so a bad scheduler config fails at load time, not mid-generation.
        load_scheduler(&scheduler_file)?;
        Ok(Self {
            spec,
            tokenizer: T5Tokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: T5EncoderModel::from_dir(&dir.join("text_encoder"), dtype, &device)?,
            runtime,
            scheduler_file,
            vae,
            device,
        })
    }

    /// `PixArtAlphaPipeline.from_pretrained(model)`: a folder or a Hub id.
    pub fn from_pretrained(engine: &EngineConfig) -> Result<Self> {
        let dir = crate::hub::resolve_model(&engine.model.model)?;
        Self::load(&PIXART_ALPHA, &dir, engine)
    }

    /// The transformer (with PipeFusion or tensor parallelism: its first stage's first shard,
    /// which knows the model's facts).
    pub fn transformer(&self) -> &dyn Backbone {
        self.runtime.transformer()
    }

    /// The parts of the transformer, one per PipeFusion stage and tensor-parallel position,
    /// stage-major (one in all when P = T = 1).
    pub fn stage_transformers(&self) -> impl Iterator<Item = &dyn Backbone> {
        self.runtime.stage_transformers()
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

    /// The transformer's conditioning of one side of guidance: the text, its mask and, for
    /// PixArt-α at sample_size 128, the micro-conditioning (B, 2) [height, width] and (B, 1)
    /// height / width.
    fn conditioning(&self, text: TextConditioning, plan: &PixArtPlan) -> Result<Conditioning> {
        let mut conditioning = Conditioning::new()
            .with(names::ENCODER_HIDDEN_STATES, text.embeds)
            .with(names::ENCODER_ATTENTION_MASK, text.mask);
        if self.spec.micro_conditioning && self.transformer().info().sample_size == 128 {
            let (batch, height, width) = (plan.batch, plan.height, plan.width);
            let resolution =
                Tensor::new(&[[height as f32, width as f32]], &self.device)?.repeat((batch, 1))?;
            let aspect = Tensor::new(&[[(height as f64 / width as f64) as f32]], &self.device)?
                .repeat((batch, 1))?;
            conditioning.insert(RESOLUTION, resolution);
            conditioning.insert(ASPECT_RATIO, aspect);
        }
        Ok(conditioning)
    }
}

/// `_text_preprocessing` with `clean_caption=False`: lowercase, strip surrounding whitespace.
fn preprocess_text(text: &str) -> String {
    text.to_lowercase().trim().to_string()
}

impl DenoisingPipeline for PixArtPipeline {
    type Plan = PixArtPlan;

    /// Validates the request against the model and fixes its sizes, before any work.
    fn plan(&self, input: &InputConfig) -> Result<(RunShape, PixArtPlan)> {
        input.validate(self.vae_scale_factor())?;
        let ((height, width), (requested_height, requested_width)) = self.generation_size(input)?;
        // The latent must cut into whole transformer patches. Binned sizes always do; a size
        // asked for without binning must be a multiple of the VAE factor times the patch size.
        let multiple = self.runtime.size_multiple();
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
        let cfg = CfgUse::from_guidance_scale(input.guidance_scale);
        let shape = RunShape {
            height,
            width,
            batch,
            cfg: cfg.clone(),
        };
        let plan = PixArtPlan {
            height,
            width,
            requested_height,
            requested_width,
            max_sequence_length,
            batch,
            cfg: cfg.is_on(),
        };
        Ok((shape, plan))
    }

    /// Encodes the text of the whole request and draws its noise.
    fn prepare(&self, plan: &PixArtPlan, input: &InputConfig) -> Result<DenoiseJob> {
        let info = self.transformer().info().clone();
        let scale = self.vae_scale_factor();
        let n = input.num_images_per_prompt;
        let (positive, negative) = encode_sides(input, plan.cfg, |prompts| {
            self.encode_prompt(prompts, n, plan.max_sequence_length)
        })?;
        let mut scheduler = load_scheduler(&self.scheduler_file)?;
        scheduler.set_timesteps(input.num_inference_steps)?;
        let mut generator = Generator::manual_seed(input.seed);
        let shape = (
            plan.batch,
            info.in_channels,
            plan.height / scale,
            plan.width / scale,
        );
        let latents = initial_latents(input, shape, &mut generator, &self.device)?;
        let latents = (latents * scheduler.init_noise_sigma())?;
        let guidance = Guidance {
            positive: self.conditioning(positive, plan)?,
            negative: negative.map(|n| self.conditioning(n, plan)).transpose()?,
            guidance_scale: input.guidance_scale,
        };
        Ok(DenoiseJob {
            latents,
            guidance,
            scheduler,
            generator,
        })
    }

    /// VAE decode, resize-and-crop back to the requested size after binning, to 8-bit RGB.
    fn decode(&self, plan: &PixArtPlan, latents: &Tensor) -> Result<Vec<RgbImage>> {
        to_requested_rgb(plan, self.vae.decode_latents(latents)?)
    }

    /// As [`Self::decode`], the VAE decode split by rows over `group`.
    fn decode_parallel(
        &self,
        plan: &PixArtPlan,
        latents: &Tensor,
        group: &ProcessGroup,
    ) -> Result<Vec<RgbImage>> {
        match self.vae.decode_latents_parallel(latents, group)? {
            Some(images) => to_requested_rgb(plan, images),
            None => Ok(Vec::new()),
        }
    }
}

/// Decoded images to 8-bit RGB, resized and cropped back to the requested size after binning.
fn to_requested_rgb(plan: &PixArtPlan, mut images: Tensor) -> Result<Vec<RgbImage>> {
    if (plan.height, plan.width) != (plan.requested_height, plan.requested_width) {
        images = resize_and_crop_tensor(&images, plan.requested_width, plan.requested_height)?;
    }
    u8_to_rgb(&postprocess_u8(&images)?)
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
        self.runtime.generate(self, input, on_step)
    }
}

fn load_alpha(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
    Ok(Box::new(PixArtPipeline::load(&PIXART_ALPHA, dir, engine)?))
}

xfuser_core::inventory::submit! {
    PipelineEntry { class_name: "PixArtAlphaPipeline", load: load_alpha }
}
