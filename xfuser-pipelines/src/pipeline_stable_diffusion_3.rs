//! Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`), as diffusers' pipeline: two CLIP
//! text encoders (penultimate hidden states and pooled projections) and T5, joined into one
//! text sequence; classifier-free guidance with a negative prompt; the flow-matching Euler
//! scheduler; the 16-channel VAE with its shift and scaling factors.
//!
//! The second and third prompts of diffusers (`prompt_2`, `prompt_3`) are the prompt itself,
//! diffusers' default; `clip_skip` and skip-layer guidance are not offered.
//!
//! A repository without `text_encoder_3` (allowed by diffusers to save memory) gets zeros in
//! place of the T5 embeddings, as diffusers does. Everything parallel is the runtime's
//! ([`crate::runtime`]).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use xfuser_core::backbone::{names, Backbone, Conditioning};
use xfuser_core::distributed::{CfgUse, ProcessGroup};
use xfuser_core::engine::{EngineConfig, InputConfig, PipelineOutput, RgbImage};
use xfuser_core::pipeline::DiffusionPipeline;
use xfuser_core::random::Generator;
use xfuser_core::registry::{load_scheduler, PipelineEntry};
use xfuser_core::scheduler::TimestepOptions;
use xfuser_core::{Error, Result};

use crate::denoise::Guidance;
use crate::pipeline_utils::{has_component, read_model_index, DynamicShift};
use crate::runtime::{
    encode_sides, initial_latents, DenoiseJob, DenoisingPipeline, DiTRuntime, RunShape,
};
use crate::text::clip::ClipTextModelWithProjection;
use crate::text::clip_tokenizer::ClipTokenizer;
use crate::text::t5::T5EncoderModel;
use crate::text::tokenizer::T5Tokenizer;
use crate::vae::{AutoencoderKL, VaeConfig};

pub const CLASS_NAME: &str = "StableDiffusion3Pipeline";

/// The backbone this pipeline runs.
const SD3_TRANSFORMER: &str = "SD3Transformer2DModel";

/// diffusers' default `max_sequence_length` for the T5 tokens.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 256;

/// The CLIP token length (the tokenizers' `model_max_length`).
const CLIP_MAX_LENGTH: usize = 77;

/// T5, when the repository has it.
struct T5Side {
    tokenizer: T5Tokenizer,
    encoder: T5EncoderModel,
}

/// A loaded Stable Diffusion 3 pipeline.
pub struct StableDiffusion3Pipeline {
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModelWithProjection,
    text_encoder_2: ClipTextModelWithProjection,
    t5: Option<T5Side>,
    runtime: DiTRuntime,
    scheduler_file: PathBuf,
    shift: DynamicShift,
    vae: AutoencoderKL,
    device: Device,
}

/// The SD3 pipeline, named as xDiT's.
#[allow(non_camel_case_types)]
pub type xFuserStableDiffusion3Pipeline = StableDiffusion3Pipeline;

/// What one request resolves to before any rank starts.
#[derive(Debug, Clone, Copy)]
pub struct Sd3Plan {
    height: usize,
    width: usize,
    max_sequence_length: usize,
    batch: usize,
    cfg: bool,
}

/// The text conditioning of one side of guidance: (B, 77 + L, joint_attention_dim) and
/// (B, pooled_dim).
#[derive(Debug, Clone)]
pub struct Sd3PromptEmbeds {
    pub prompt_embeds: Tensor,
    pub pooled_prompt_embeds: Tensor,
}

impl StableDiffusion3Pipeline {
    /// Loads every component of the diffusers folder `dir`.
    pub fn load(dir: &Path, engine: &EngineConfig) -> Result<Self> {
        let index = read_model_index(
            dir,
            CLASS_NAME,
            &[
                "tokenizer",
                "tokenizer_2",
                "text_encoder",
                "text_encoder_2",
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
            CLASS_NAME,
            &[SD3_TRANSFORMER],
            vae_scale_factor,
            engine,
        )?;
        let vae = AutoencoderKL::load(&dir.join("vae"), dtype, &device)?;
        let scheduler_file = dir.join("scheduler/scheduler_config.json");
        // Parse it now so a bad scheduler config fails at load time, not mid-generation.
        load_scheduler(&scheduler_file)?;
        let shift = DynamicShift::read(&scheduler_file, 1.16)?;
        let t5 = if has_component(&index, "text_encoder_3") {
            Some(T5Side {
                tokenizer: T5Tokenizer::from_dir(&dir.join("tokenizer_3"))?,
                encoder: T5EncoderModel::from_dir(&dir.join("text_encoder_3"), dtype, &device)?,
            })
        } else {
            None
        };
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
            text_encoder: ClipTextModelWithProjection::from_dir(
                &dir.join("text_encoder"),
                dtype,
                &device,
            )?,
            text_encoder_2: ClipTextModelWithProjection::from_dir(
                &dir.join("text_encoder_2"),
                dtype,
                &device,
            )?,
            t5,
            runtime,
            scheduler_file,
            shift,
            vae,
            device,
        })
    }

    /// `StableDiffusion3Pipeline.from_pretrained(model)`: a folder or a Hub id.
    pub fn from_pretrained(engine: &EngineConfig) -> Result<Self> {
        let dir = crate::hub::resolve_model(&engine.model.model)?;
        Self::load(&dir, engine)
    }

    /// The transformer (with PipeFusion: its first stage).
    pub fn transformer(&self) -> &dyn Backbone {
        self.runtime.transformer()
    }

    /// The transformer's `joint_attention_dim`, the width of the joined text.
    fn text_dim(&self) -> usize {
        self.transformer().info().caption_channels
    }

    /// One CLIP encoder's (penultimate (B, 77, H), pooled (B, P)) for `prompts`.
    fn clip_embeds(
        &self,
        tokenizer: &ClipTokenizer,
        encoder: &ClipTextModelWithProjection,
        prompts: &[&str],
    ) -> Result<(Tensor, Tensor)> {
        let ids = tokenizer.encode_batch(prompts, CLIP_MAX_LENGTH, &self.device)?;
        let out = encoder.forward(&ids)?;
        Ok((out.penultimate, out.pooled))
    }

    /// T5's (B, L, joint_attention_dim), or zeros without `text_encoder_3`.
    fn t5_embeds(&self, prompts: &[&str], max_sequence_length: usize) -> Result<Tensor> {
        match &self.t5 {
            Some(t5) => {
                let tokens =
                    t5.tokenizer
                        .encode_batch(prompts, max_sequence_length, &self.device)?;
                // SD3 passes the ids alone: no attention mask.
                t5.encoder.forward(&tokens.input_ids, None)
            }
            None => Ok(Tensor::zeros(
                (prompts.len(), max_sequence_length, self.text_dim()),
                self.vae.dtype(),
                &self.device,
            )?),
        }
    }

    /// diffusers' `encode_prompt` for one side: both CLIP penultimate states joined on the
    /// feature axis and zero-padded to T5's width, then T5's tokens after them; the pooled
    /// projections joined. Each prompt's rows repeated `num_images_per_prompt` times in a row.
    pub fn encode_prompt(
        &self,
        prompts: &[String],
        num_images_per_prompt: usize,
        max_sequence_length: usize,
    ) -> Result<Sd3PromptEmbeds> {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let (l_embeds, l_pooled) = self.clip_embeds(&self.tokenizer, &self.text_encoder, &refs)?;
        let (g_embeds, g_pooled) =
            self.clip_embeds(&self.tokenizer_2, &self.text_encoder_2, &refs)?;
        let clip = Tensor::cat(&[&l_embeds, &g_embeds], 2)?;
        let t5 = self.t5_embeds(&refs, max_sequence_length)?;
        let (clip_width, t5_width) = (clip.dim(2)?, t5.dim(2)?);
        if clip_width > t5_width {
            return Err(Error::invalid(format!(
                "the two CLIP encoders' hidden sizes sum to {clip_width}, wider than the T5 / \
                 joint_attention_dim width {t5_width}: these components do not belong together"
            )));
        }
        let clip = clip.pad_with_zeros(2, 0, t5_width - clip_width)?;
        let embeds = Tensor::cat(&[&clip, &t5.to_dtype(clip.dtype())?], 1)?;
        let pooled = Tensor::cat(&[&l_pooled, &g_pooled], 1)?;
        let n = num_images_per_prompt;
        let (b, l, c) = embeds.dims3()?;
        let p = pooled.dim(1)?;
        Ok(Sd3PromptEmbeds {
            prompt_embeds: embeds.repeat((1, n, 1))?.reshape((b * n, l, c))?,
            pooled_prompt_embeds: pooled.repeat((1, n))?.reshape((b * n, p))?,
        })
    }

    fn conditioning(embeds: Sd3PromptEmbeds) -> Conditioning {
        Conditioning::new()
            .with(names::ENCODER_HIDDEN_STATES, embeds.prompt_embeds)
            .with(names::POOLED_PROJECTIONS, embeds.pooled_prompt_embeds)
    }
}

impl DenoisingPipeline for StableDiffusion3Pipeline {
    type Plan = Sd3Plan;

    fn plan(&self, input: &InputConfig) -> Result<(RunShape, Sd3Plan)> {
        let multiple = self.runtime.size_multiple();
        input.validate(multiple)?;
        let default = self.transformer().info().sample_size * self.vae.vae_scale_factor();
        let height = input.height.unwrap_or(default);
        let width = input.width.unwrap_or(default);
        let max_sequence_length = input
            .max_sequence_length
            .unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
        if max_sequence_length == 0 || max_sequence_length > 512 {
            return Err(Error::invalid(format!(
                "--max-sequence-length {max_sequence_length} must be between 1 and 512 for \
                 {CLASS_NAME}"
            )));
        }
        let batch = input.prompts.len() * input.num_images_per_prompt;
        let cfg = CfgUse::from_guidance_scale(input.guidance_scale);
        let shape = RunShape {
            height,
            width,
            batch,
            cfg: cfg.clone(),
        };
        let plan = Sd3Plan {
            height,
            width,
            max_sequence_length,
            batch,
            cfg: cfg.is_on(),
        };
        Ok((shape, plan))
    }

    fn prepare(&self, plan: &Sd3Plan, input: &InputConfig) -> Result<DenoiseJob> {
        let info = self.transformer().info().clone();
        let scale = self.vae.vae_scale_factor();
        let n = input.num_images_per_prompt;
        let (positive, negative) = encode_sides(input, plan.cfg, |prompts| {
            self.encode_prompt(prompts, n, plan.max_sequence_length)
        })?;
        let mut generator = Generator::manual_seed(input.seed);
        let shape = (
            plan.batch,
            info.in_channels,
            plan.height / scale,
            plan.width / scale,
        );
        // diffusers draws the noise before it sets the timesteps; neither touches the other.
        let latents = initial_latents(input, shape, &mut generator, &self.device)?;
        let mut scheduler = load_scheduler(&self.scheduler_file)?;
        let options =
            TimestepOptions {
                mu: self.shift.mu((plan.height / scale / info.patch_size)
                    * (plan.width / scale / info.patch_size)),
                ..Default::default()
            };
        scheduler.set_timesteps_with(input.num_inference_steps, &options)?;
        let latents = (latents * scheduler.init_noise_sigma())?;
        Ok(DenoiseJob {
            latents,
            guidance: Guidance {
                positive: Self::conditioning(positive),
                negative: negative.map(Self::conditioning),
                guidance_scale: input.guidance_scale,
            },
            scheduler,
            generator,
        })
    }

    /// `vae.decode(latents / scaling_factor + shift_factor)`, to 8-bit RGB.
    fn decode(&self, _plan: &Sd3Plan, latents: &Tensor) -> Result<Vec<RgbImage>> {
        self.vae.shifted_latents_to_rgb(latents, None)
    }

    /// As [`Self::decode`], the VAE decode split by rows over `group`.
    fn decode_parallel(
        &self,
        _plan: &Sd3Plan,
        latents: &Tensor,
        group: &ProcessGroup,
    ) -> Result<Vec<RgbImage>> {
        self.vae.shifted_latents_to_rgb(latents, Some(group))
    }
}

impl DiffusionPipeline for StableDiffusion3Pipeline {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn generate(
        &self,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput> {
        self.runtime.generate(self, input, on_step)
    }
}

fn load_sd3(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
    Ok(Box::new(StableDiffusion3Pipeline::load(dir, engine)?))
}

xfuser_core::inventory::submit! {
    PipelineEntry { class_name: CLASS_NAME, load: load_sd3 }
}
