//! PixArt-α (`PixArtAlphaPipeline`), and the implementation PixArt-Σ shares
//! (`pipeline_pixart_sigma.rs` only differs in its defaults). As diffusers' pipeline: T5 text
//! encoding with attention masks, classifier-free guidance, the scheduler's denoising loop,
//! optional aspect-ratio binning, VAE decode.
//!
//! `clean_caption` (diffusers' default, which needs bs4 and ftfy) is not implemented: prompts
//! are lowercased and stripped, which is what diffusers does with `clean_caption=False`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xfuser_core::backbone::{Backbone, ForwardContext};
use xfuser_core::engine::{EngineConfig, InputConfig, OutputType, PipelineOutput};
use xfuser_core::pipeline::DiffusionPipeline;
use xfuser_core::random::Generator;
use xfuser_core::registry::{load_scheduler, load_transformer, LoadOptions, PipelineEntry};
use xfuser_core::{Error, Result};

use crate::binning::{classify_height_width_bin, resize_and_crop_tensor, AspectRatioBin};
use crate::denoise::{denoise, Guidance, TextConditioning};
use crate::image::{postprocess_u8, u8_to_rgb};
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
    transformer: Box<dyn Backbone>,
    scheduler_file: PathBuf,
    vae: AutoencoderKL,
    device: Device,
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
        for name in ["tokenizer", "text_encoder", "transformer", "scheduler", "vae"] {
            if components.get(name).is_none() {
                return Err(Error::Config {
                    file: index.clone(),
                    field: name.into(),
                    message: format!("missing component `{name}` required by {}", spec.class_name),
                });
            }
        }
        let (dtype, device) = (engine.model.dtype, engine.model.device.clone());
        let options = LoadOptions {
            dtype,
            device: device.clone(),
        };
        let scheduler_file = dir.join("scheduler/scheduler_config.json");
        // Parse it now so a bad scheduler config fails at load time, not mid-generation.
        load_scheduler(&scheduler_file)?;
        Ok(Self {
            spec,
            tokenizer: T5Tokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: T5EncoderModel::from_dir(&dir.join("text_encoder"), dtype, &device)?,
            transformer: load_transformer(&dir.join("transformer"), &options)?,
            scheduler_file,
            vae: AutoencoderKL::load(&dir.join("vae"), dtype, &device)?,
            device,
        })
    }

    /// `PixArtAlphaPipeline.from_pretrained(model)`: a folder or a Hub id.
    pub fn from_pretrained(engine: &EngineConfig) -> Result<Self> {
        let dir = crate::hub::resolve_model(&engine.model.model)?;
        Self::load(&PIXART_ALPHA, &dir, engine)
    }

    pub fn transformer(&self) -> &dyn Backbone {
        self.transformer.as_ref()
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
        let info = self.transformer.info();
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
        if !self.spec.micro_conditioning || self.transformer.info().sample_size != 128 {
            return Ok((None, None));
        }
        let resolution = Tensor::new(&[[height as f32, width as f32]], &self.device)?
            .repeat((batch, 1))?;
        let aspect =
            Tensor::new(&[[(height as f64 / width as f64) as f32]], &self.device)?.repeat((batch, 1))?;
        Ok((Some(resolution), Some(aspect)))
    }
}

/// `_text_preprocessing` with `clean_caption=False`: lowercase, strip surrounding whitespace.
fn preprocess_text(text: &str) -> String {
    text.to_lowercase().trim().to_string()
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
        let scale = self.vae_scale_factor();
        input.validate(scale)?;
        let info = self.transformer.info().clone();
        let ((height, width), (requested_height, requested_width)) =
            self.generation_size(input)?;
        let max_len = input
            .max_sequence_length
            .unwrap_or(self.spec.default_max_sequence_length);
        if max_len == 0 {
            return Err(Error::invalid("--max-sequence-length must be at least 1"));
        }
        let n = input.num_images_per_prompt;
        let batch = input.prompts.len() * n;

        let positive = self.encode_prompt(&input.prompts, n, max_len)?;
        let negative = if input.uses_cfg() {
            let negatives = vec![input.negative_prompt.clone(); input.prompts.len()];
            Some(self.encode_prompt(&negatives, n, max_len)?)
        } else {
            None
        };

        let mut scheduler = load_scheduler(&self.scheduler_file)?;
        scheduler.set_timesteps(input.num_inference_steps)?;
        let mut generator = Generator::manual_seed(input.seed);
        let shape = (batch, info.in_channels, height / scale, width / scale);
        let latents = self.initial_latents(input, shape, &mut generator)?;
        let latents = (latents * scheduler.init_noise_sigma())?;

        let (resolution, aspect_ratio) = self.micro_conditions(batch, height, width)?;
        let guidance = Guidance {
            positive,
            negative,
            guidance_scale: input.guidance_scale,
            resolution,
            aspect_ratio,
        };
        let latents = denoise(
            self.transformer.as_ref(),
            scheduler.as_ref(),
            latents,
            &guidance,
            &ForwardContext::default(),
            Some(&mut generator),
            on_step,
        )?;
        if input.output_type == OutputType::Latent {
            return Ok(PipelineOutput {
                latents,
                images: Vec::new(),
            });
        }
        let mut images = self.vae.decode_latents(&latents)?;
        if (height, width) != (requested_height, requested_width) {
            images = resize_and_crop_tensor(&images, requested_width, requested_height)?;
        }
        let images = u8_to_rgb(&postprocess_u8(&images)?)?;
        Ok(PipelineOutput { latents, images })
    }
}

fn load_alpha(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
    Ok(Box::new(PixArtPipeline::load(&PIXART_ALPHA, dir, engine)?))
}

xfuser_core::inventory::submit! {
    PipelineEntry { class_name: "PixArtAlphaPipeline", load: load_alpha }
}
