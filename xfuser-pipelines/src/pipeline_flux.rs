//! Flux.1 dev and schnell (`FluxPipeline`), as diffusers' pipeline: CLIP-L (`CLIPTextModel`)
//! gives the pooled text vector, T5 (`text_encoder_2`) the token sequence; the transformer
//! embeds the guidance scale (dev, `guidance_embeds`) instead of running classifier-free
//! guidance, which Flux has only as diffusers' "true CFG" (`true_cfg_scale` above 1 with a
//! negative prompt); the flow-matching Euler scheduler on Flux's sigmas `linspace(1, 1/n, n)`,
//! shifted by `mu` from the image's token count when the scheduler shifts dynamically; the
//! 16-channel VAE with its shift and scaling factors.
//!
//! Latents stay unpacked, (B, 16, H/8, W/8), through the runtime: the transformer packs 2×2
//! latent pixels into a token inside its `embed` and unpacks in `head`, and the initial noise
//! is drawn in that layout, as diffusers draws it before packing. `--output-type latent`
//! therefore gives the unpacked latents. The second prompt of diffusers (`prompt_2`) is the
//! prompt itself, its default. Everything parallel is the runtime's ([`crate::runtime`]).

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
use crate::pipeline_utils::{read_model_index, DynamicShift};
use crate::runtime::{
    encode_sides, initial_latents, DenoiseJob, DenoisingPipeline, DiTRuntime, RunShape,
};
use crate::text::clip::ClipTextModelWithProjection;
use crate::text::clip_tokenizer::ClipTokenizer;
use crate::text::t5::T5EncoderModel;
use crate::text::tokenizer::T5Tokenizer;
use crate::vae::{AutoencoderKL, VaeConfig};

pub const CLASS_NAME: &str = "FluxPipeline";

/// The backbone this pipeline runs.
const FLUX_TRANSFORMER: &str = "FluxTransformer2DModel";

/// diffusers' default `max_sequence_length` for the T5 tokens (also its maximum).
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// The CLIP token length (`tokenizer_max_length`).
const CLIP_MAX_LENGTH: usize = 77;

/// What `--use-cfg-parallel` without true CFG is told.
pub const HOW_TO_ENABLE_CFG: &str = "Flux uses guidance embedding, not classifier-free \
     guidance: pass --true-cfg-scale above 1 with a --negative-prompt";

/// The one transformer setting the pipeline reads itself.
#[derive(Debug, Clone, serde::Deserialize)]
struct GuidanceConfig {
    #[serde(default)]
    guidance_embeds: bool,
}

/// A loaded Flux pipeline.
pub struct FluxPipeline {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModelWithProjection,
    tokenizer_2: T5Tokenizer,
    text_encoder_2: T5EncoderModel,
    runtime: DiTRuntime,
    guidance_embeds: bool,
    scheduler_file: PathBuf,
    shift: DynamicShift,
    vae: AutoencoderKL,
    device: Device,
}

/// The Flux pipeline, named as xDiT's.
#[allow(non_camel_case_types)]
pub type xFuserFluxPipeline = FluxPipeline;

/// What one request resolves to before any rank starts.
#[derive(Debug, Clone, Copy)]
pub struct FluxPlan {
    height: usize,
    width: usize,
    max_sequence_length: usize,
    batch: usize,
    /// diffusers' `do_true_cfg`.
    true_cfg: bool,
}

/// The text conditioning of one side: T5's (B, L, joint_attention_dim) and CLIP's pooled
/// (B, pooled_projection_dim).
#[derive(Debug, Clone)]
pub struct FluxPromptEmbeds {
    pub prompt_embeds: Tensor,
    pub pooled_prompt_embeds: Tensor,
}

impl FluxPipeline {
    /// Loads every component of the diffusers folder `dir`.
    pub fn load(dir: &Path, engine: &EngineConfig) -> Result<Self> {
        read_model_index(
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
            &[FLUX_TRANSFORMER],
            vae_scale_factor,
            engine,
        )?;
        let guidance: GuidanceConfig =
            xfuser_core::config::read_json_config(&dir.join("transformer/config.json"))?;
        let vae = AutoencoderKL::load(&dir.join("vae"), dtype, &device)?;
        let scheduler_file = dir.join("scheduler/scheduler_config.json");
        // Parse it now so a bad scheduler config fails at load time, not mid-generation.
        load_scheduler(&scheduler_file)?;
        let shift = DynamicShift::read(&scheduler_file, 1.15)?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: ClipTextModelWithProjection::text_model_from_dir(
                &dir.join("text_encoder"),
                dtype,
                &device,
            )?,
            tokenizer_2: T5Tokenizer::from_dir(&dir.join("tokenizer_2"))?,
            text_encoder_2: T5EncoderModel::from_dir(&dir.join("text_encoder_2"), dtype, &device)?,
            runtime,
            guidance_embeds: guidance.guidance_embeds,
            scheduler_file,
            shift,
            vae,
            device,
        })
    }

    /// `FluxPipeline.from_pretrained(model)`: a folder or a Hub id.
    pub fn from_pretrained(engine: &EngineConfig) -> Result<Self> {
        let dir = crate::hub::resolve_model(&engine.model.model)?;
        Self::load(&dir, engine)
    }

    /// The transformer (with PipeFusion: its first stage).
    pub fn transformer(&self) -> &dyn Backbone {
        self.runtime.transformer()
    }

    /// Whether the transformer embeds the guidance scale (Flux.1-dev) or not (schnell).
    pub fn guidance_embeds(&self) -> bool {
        self.guidance_embeds
    }

    /// diffusers' `encode_prompt`: T5's last hidden state (no attention mask) and CLIP's
    /// `pooler_output`, each prompt's rows repeated `num_images_per_prompt` times in a row.
    pub fn encode_prompt(
        &self,
        prompts: &[String],
        num_images_per_prompt: usize,
        max_sequence_length: usize,
    ) -> Result<FluxPromptEmbeds> {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = self
            .tokenizer
            .encode_batch(&refs, CLIP_MAX_LENGTH, &self.device)?;
        let pooled = self.text_encoder.forward(&ids)?.pooled;
        let tokens = self
            .tokenizer_2
            .encode_batch(&refs, max_sequence_length, &self.device)?;
        let embeds = self.text_encoder_2.forward(&tokens.input_ids, None)?;
        let n = num_images_per_prompt;
        let (b, l, c) = embeds.dims3()?;
        let p = pooled.dim(1)?;
        Ok(FluxPromptEmbeds {
            prompt_embeds: embeds.repeat((1, n, 1))?.reshape((b * n, l, c))?,
            pooled_prompt_embeds: pooled.repeat((1, n))?.reshape((b * n, p))?,
        })
    }

    /// One side's conditioning; `guidance` (B,) for a transformer that embeds it.
    fn conditioning(&self, embeds: FluxPromptEmbeds, guidance_scale: f64) -> Result<Conditioning> {
        let batch = embeds.prompt_embeds.dim(0)?;
        let mut cond = Conditioning::new()
            .with(names::ENCODER_HIDDEN_STATES, embeds.prompt_embeds)
            .with(names::POOLED_PROJECTIONS, embeds.pooled_prompt_embeds);
        if self.guidance_embeds {
            // diffusers: torch.full([1], guidance_scale, dtype=float32), expanded to the batch.
            let guidance = Tensor::full(guidance_scale as f32, batch, &self.device)?;
            cond.insert(names::GUIDANCE, guidance);
        }
        Ok(cond)
    }
}

/// FluxPipeline's sigmas, `np.linspace(1.0, 1 / n, n)` (numpy: `i · step + start`, the
/// last value exactly the stop).
fn flux_sigmas(steps: usize) -> Vec<f64> {
    let end = 1.0 / steps as f64;
    if steps <= 1 {
        return vec![1.0; steps];
    }
    let step = (end - 1.0) / (steps - 1) as f64;
    let mut sigmas: Vec<f64> = (0..steps).map(|i| i as f64 * step + 1.0).collect();
    sigmas[steps - 1] = end;
    sigmas
}

impl DenoisingPipeline for FluxPipeline {
    type Plan = FluxPlan;

    fn plan(&self, input: &InputConfig) -> Result<(RunShape, FluxPlan)> {
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
        let true_cfg = input.true_cfg_scale > 1.0 && !input.negative_prompt.is_empty();
        let cfg = if true_cfg {
            CfgUse::On
        } else {
            CfgUse::Off {
                how_to_enable: HOW_TO_ENABLE_CFG.into(),
            }
        };
        let shape = RunShape {
            height,
            width,
            batch,
            cfg,
        };
        let plan = FluxPlan {
            height,
            width,
            max_sequence_length,
            batch,
            true_cfg,
        };
        Ok((shape, plan))
    }

    fn prepare(&self, plan: &FluxPlan, input: &InputConfig) -> Result<DenoiseJob> {
        let info = self.transformer().info().clone();
        let scale = self.vae.vae_scale_factor();
        let n = input.num_images_per_prompt;
        let (positive, negative) = encode_sides(input, plan.true_cfg, |prompts| {
            self.encode_prompt(prompts, n, plan.max_sequence_length)
        })?;
        let mut generator = Generator::manual_seed(input.seed);
        let shape = (
            plan.batch,
            info.in_channels,
            plan.height / scale,
            plan.width / scale,
        );
        // diffusers draws the noise in this (unpacked) layout and packs it afterwards.
        let latents = initial_latents(input, shape, &mut generator, &self.device)?;
        let mut scheduler = load_scheduler(&self.scheduler_file)?;
        let steps = input.num_inference_steps;
        let options =
            TimestepOptions {
                mu: self.shift.mu((plan.height / scale / info.patch_size)
                    * (plan.width / scale / info.patch_size)),
                sigmas: Some(flux_sigmas(steps)),
            };
        scheduler.set_timesteps_with(steps, &options)?;
        let latents = (latents * scheduler.init_noise_sigma())?;
        let guidance_scale = input.guidance_scale;
        Ok(DenoiseJob {
            latents,
            guidance: Guidance {
                positive: self.conditioning(positive, guidance_scale)?,
                negative: negative
                    .map(|n| self.conditioning(n, guidance_scale))
                    .transpose()?,
                guidance_scale: input.true_cfg_scale,
            },
            scheduler,
            generator,
        })
    }

    /// `vae.decode(latents / scaling_factor + shift_factor)`, to 8-bit RGB.
    fn decode(&self, _plan: &FluxPlan, latents: &Tensor) -> Result<Vec<RgbImage>> {
        self.vae.shifted_latents_to_rgb(latents, None)
    }

    /// As [`Self::decode`], the VAE decode split by rows over `group`.
    fn decode_parallel(
        &self,
        _plan: &FluxPlan,
        latents: &Tensor,
        group: &ProcessGroup,
    ) -> Result<Vec<RgbImage>> {
        self.vae.shifted_latents_to_rgb(latents, Some(group))
    }
}

impl DiffusionPipeline for FluxPipeline {
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

fn load_flux(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
    Ok(Box::new(FluxPipeline::load(dir, engine)?))
}

xfuser_core::inventory::submit! {
    PipelineEntry { class_name: CLASS_NAME, load: load_flux }
}
