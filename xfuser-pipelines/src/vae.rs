//! The VAE decoder of the PixArt pipelines: diffusers' `AutoencoderKL`
//! (`models/autoencoders/autoencoder_kl.py`) as candle-transformers' Stable Diffusion
//! `AutoEncoderKL` implements it, with the config read and checked here, and the latents
//! unscaled as diffusers' PixArt pipelines do before `vae.decode`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use xfuser_core::distributed::ProcessGroup;
use xfuser_core::weights::WeightFiles;
use xfuser_core::{Error, Result};

use crate::parallel_vae::ParallelVaeDecoder;

pub const CLASS_NAME: &str = "AutoencoderKL";

/// The only block types candle's VAE builds (diffusers' defaults, used by every PixArt VAE).
const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

/// `vae/config.json`, field for field with diffusers' `AutoencoderKL.__init__` defaults (a key
/// absent from the file takes the default, as in diffusers). Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Read but not applied: diffusers' PixArt pipelines divide by `scaling_factor` only.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Only the PixArt pipelines' fp16 handling would read this; decoding runs in the dtype the
    /// VAE is loaded in, as in those pipelines.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_in_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec![DOWN_BLOCK.into()]
}
fn default_up_block_types() -> Vec<String> {
    vec![UP_BLOCK.into()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_sample_size() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// Reads `path` (a `vae/config.json`) and checks that candle's VAE can run it.
    pub fn load(path: &Path) -> Result<Self> {
        let config: Self = xfuser_core::config::read_json_config(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// `2^(len(block_out_channels) - 1)`: pixels per latent along each side.
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Errors name `path` and the first field at fault: [`Error::Unsupported`] for something
    /// diffusers runs and candle's VAE does not, [`Error::Config`] for an inconsistent config.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |field: &str, value: &str, why: &str| {
            Err(Error::Unsupported(format!(
                "{}: field `{field}`: `{value}` is not supported; {why}",
                path.display()
            )))
        };
        let inconsistent = |field: &str, message: String| {
            Err(Error::Config {
                file: path.to_path_buf(),
                field: field.into(),
                message,
            })
        };
        for (field, types, only) in [
            ("down_block_types", &self.down_block_types, DOWN_BLOCK),
            ("up_block_types", &self.up_block_types, UP_BLOCK),
        ] {
            if let Some(other) = types.iter().find(|t| t.as_str() != only) {
                return unsupported(field, other, &format!("only `{only}`"));
            }
            if types.len() != self.block_out_channels.len() {
                return inconsistent(
                    field,
                    format!(
                        "{} entries, but block_out_channels has {}",
                        types.len(),
                        self.block_out_channels.len()
                    ),
                );
            }
        }
        if self.act_fn != "silu" {
            return unsupported("act_fn", &self.act_fn, "only `silu`");
        }
        if !self.mid_block_add_attention {
            return unsupported(
                "mid_block_add_attention",
                "false",
                "candle's VAE always has the mid-block attention",
            );
        }
        if self.block_out_channels.is_empty() || self.block_out_channels.contains(&0) {
            return inconsistent(
                "block_out_channels",
                format!(
                    "{:?}: needs at least one block, each with channels",
                    self.block_out_channels
                ),
            );
        }
        if self.norm_num_groups == 0 {
            return inconsistent("norm_num_groups", "must be positive".into());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| *c % self.norm_num_groups != 0)
        {
            return inconsistent(
                "norm_num_groups",
                format!(
                    "{} does not divide block_out_channels entry {c}",
                    self.norm_num_groups
                ),
            );
        }
        if self.latent_channels == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return inconsistent(
                "latent_channels",
                "latent_channels, in_channels and out_channels must be positive".into(),
            );
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return inconsistent(
                "scaling_factor",
                format!("{}: must be finite and non-zero", self.scaling_factor),
            );
        }
        Ok(())
    }

    fn candle_config(&self) -> AutoEncoderKLConfig {
        AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        }
    }
}

/// The dtype the VAE decodes in for a pipeline computing in `dtype` on `device`: the
/// pipeline's (as diffusers' pipelines decode), except bf16 on the CPU, which decodes in f32:
/// candle's CPU convolutions have no bf16 kernel (its bf16 matmul widens to f32 anyway), and the
/// decoder is almost all convolutions. On CUDA every dtype decodes as asked.
pub fn decode_dtype(dtype: DType, device: &Device) -> DType {
    match (dtype, device) {
        (DType::BF16, Device::Cpu) => DType::F32,
        _ => dtype,
    }
}

/// A loaded `AutoencoderKL`, used for decoding.
///
/// Loading checks every weight either decoder needs (present, right shape) but keeps none:
/// each decoder reads its weights on first use, so a process that never decodes (a rank that
/// does not lead its data-parallel group) holds no VAE weights, and one that decodes (alone or
/// with `--use-parallel-vae`) holds only the band decoder's.
pub struct AutoencoderKL {
    config: VaeConfig,
    /// candle-transformers' whole VAE (the encoder too), built on the first
    /// [`Self::decode_candle`].
    model: Mutex<Option<Arc<AutoEncoderKL>>>,
    dtype: DType,
    dir: PathBuf,
    /// The weights (for the band-split decoder) and, when read from files, those files (for
    /// errors).
    vb: VarBuilder<'static>,
    weights: Option<WeightFiles>,
    /// The band-split decoder (every decode: one band alone, a band per rank with
    /// `--use-parallel-vae`), built from the same weights on first use.
    parallel: Mutex<Option<Arc<ParallelVaeDecoder>>>,
}

impl std::fmt::Debug for AutoencoderKL {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoencoderKL")
            .field("dir", &self.dir)
            .field("dtype", &self.dtype)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AutoencoderKL {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (or its sharded
    /// index) in `dtype` ([`decode_dtype`]: f32 for bf16 on the CPU). Errors name the config
    /// file and field, or the weights file and the tensor.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let dtype = decode_dtype(dtype, device);
        let config = VaeConfig::load(&dir.join("config.json"))?;
        let weights = WeightFiles::find(dir, "diffusion_pytorch_model")?;
        let vb = weights.var_builder(dtype, device)?;
        let mut vae = Self::from_var_builder(config, vb, dtype, dir).map_err(|e| match e {
            Error::Candle(e) => weights.error(e),
            other => other,
        })?;
        vae.weights = Some(weights);
        Ok(vae)
    }

    /// A VAE of `config` whose weights come from `vb` (diffusers' names), e.g. random weights
    /// for a benchmark; `dir` is what errors name. `config` must be valid
    /// ([`VaeConfig::validate`]).
    pub fn from_var_builder(
        config: VaeConfig,
        vb: VarBuilder<'static>,
        dtype: DType,
        dir: &Path,
    ) -> Result<Self> {
        // Built on stand-ins, to check the weights now; dropped at once. The encoder is built
        // too (candle has no decoder-only constructor), so its weights must be present, as
        // they are in every diffusers VAE folder.
        let checking =
            VarBuilder::from_backend(Box::new(ShapeCheck(vb.clone())), dtype, vb.device().clone());
        drop(Self::build_model(&config, checking.clone())?);
        drop(ParallelVaeDecoder::load(checking, &config)?);
        Ok(Self {
            config,
            model: Mutex::new(None),
            dtype,
            dir: dir.to_path_buf(),
            vb,
            weights: None,
            parallel: Mutex::new(None),
        })
    }

    fn build_model(config: &VaeConfig, vb: VarBuilder<'static>) -> Result<AutoEncoderKL> {
        Ok(AutoEncoderKL::new(
            vb,
            config.in_channels,
            config.out_channels,
            config.candle_config(),
        )?)
    }

    /// candle's VAE, read from the weights on the first call (ranks calling at once wait
    /// for one load).
    fn model(&self) -> Result<Arc<AutoEncoderKL>> {
        let mut slot = self.model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(model) = slot.as_ref() {
            return Ok(model.clone());
        }
        let model =
            Self::build_model(&self.config, self.vb.clone()).map_err(|e| self.weights_error(e))?;
        let model = Arc::new(model);
        *slot = Some(model.clone());
        Ok(model)
    }

    /// A candle error of reading the weights, naming the weight file where there is one.
    fn weights_error(&self, e: Error) -> Error {
        match (e, &self.weights) {
            (Error::Candle(e), Some(w)) => w.error(e),
            (e, _) => e,
        }
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.config.vae_scale_factor()
    }

    /// `vae.decode(z)` on latents already unscaled: (B, latent_channels, h, w) ->
    /// (B, out_channels, h * f, w * f), f = [`Self::vae_scale_factor`]. The band decoder of
    /// [`crate::parallel_vae`] on one band (why: that module's documentation).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_channels(z)?;
        self.parallel_decoder()?
            .decode_whole(&z.to_dtype(self.dtype)?)
    }

    /// [`Self::decode`] by candle-transformers' Stable Diffusion decoder: the independent
    /// reference the tests and `xfuser-bench vae` compare the band decoder with. Its CPU
    /// convolutions are several times slower, and at 2048 px its attention scores alone need
    /// 2 × 16 GiB.
    pub fn decode_candle(&self, z: &Tensor) -> Result<Tensor> {
        self.check_channels(z)?;
        let z = z.to_dtype(self.dtype)?;
        // One batch entry at a time: candle 0.11.1's CPU matmul folds a batch into the rows of
        // one gemm when the rhs is batch-invariant, without checking that the lhs rows are
        // contiguous, so the mid-block attention's `Linear` on its transposed (B, HW, C) view
        // returns wrong values for every entry after the first (huggingface/candle#3758).
        // Entries are independent in the VAE, so this is the batched result, as diffusers'
        // `enable_slicing` computes it too.
        let model = self.model()?;
        let images = (0..z.dim(0)?)
            .map(|i| model.decode(&z.narrow(0, i, 1)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&images, 0)?)
    }

    /// What diffusers' SD3 and Flux pipelines do with the final latents:
    /// `vae.decode(latents / scaling_factor + shift_factor)` (no shift when the config has
    /// none), an image in [-1, 1] space.
    pub fn decode_shifted_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&self.shifted(latents)?)
    }

    /// `latents / scaling_factor + shift_factor` in the VAE's dtype.
    fn shifted(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents.to_dtype(self.dtype)? / self.config.scaling_factor)?;
        Ok((z + self.config.shift_factor.unwrap_or(0.0))?)
    }

    /// `latents / scaling_factor` in the VAE's dtype.
    fn unscaled(&self, latents: &Tensor) -> Result<Tensor> {
        // Cast, then divide in the VAE's dtype, as Σ does (α divides first, and errors unless
        // the dtypes already agree, so the two are the same wherever α runs).
        Ok((latents.to_dtype(self.dtype)? / self.config.scaling_factor)?)
    }

    fn check_channels(&self, z: &Tensor) -> Result<()> {
        let (_b, c, _h, _w) = z.dims4()?;
        if c != self.config.latent_channels {
            return Err(Error::invalid(format!(
                "VAE in {}: latents have {c} channels, latent_channels is {}",
                self.dir.display(),
                self.config.latent_channels
            )));
        }
        Ok(())
    }

    /// [`Self::decode`] with the image's rows split over the members of `group`
    /// ([`crate::parallel_vae`]): every member calls it with the same `z`; member 0 gets the
    /// images, the others None. Equal to [`Self::decode`] up to f32 rounding.
    pub fn decode_parallel(&self, z: &Tensor, group: &ProcessGroup) -> Result<Option<Tensor>> {
        self.check_channels(z)?;
        let decoder = self.parallel_decoder()?;
        decoder.decode(&z.to_dtype(self.dtype)?, group)
    }

    /// [`Self::decode_latents`] through [`Self::decode_parallel`].
    pub fn decode_latents_parallel(
        &self,
        latents: &Tensor,
        group: &ProcessGroup,
    ) -> Result<Option<Tensor>> {
        self.decode_parallel(&self.unscaled(latents)?, group)
    }

    /// [`Self::decode_shifted_latents`] through [`Self::decode_parallel`].
    pub fn decode_shifted_latents_parallel(
        &self,
        latents: &Tensor,
        group: &ProcessGroup,
    ) -> Result<Option<Tensor>> {
        self.decode_parallel(&self.shifted(latents)?, group)
    }

    /// SD3's and Flux's decode: `latents / scaling_factor + shift_factor` through the VAE, to
    /// 8-bit RGB; with `group`, split by rows over it (the images on its member 0 only).
    pub fn shifted_latents_to_rgb(
        &self,
        latents: &Tensor,
        group: Option<&ProcessGroup>,
    ) -> Result<Vec<xfuser_core::engine::RgbImage>> {
        let images = match group {
            None => self.decode_shifted_latents(latents)?,
            Some(group) => match self.decode_shifted_latents_parallel(latents, group)? {
                Some(images) => images,
                None => return Ok(Vec::new()),
            },
        };
        let pixels = crate::image::postprocess_u8(&images.to_dtype(DType::F32)?)?;
        crate::image::u8_to_rgb(&pixels)
    }

    /// The band-split decoder, loaded from the weights on the first call (ranks calling at
    /// once wait for one load).
    pub(crate) fn parallel_decoder(&self) -> Result<Arc<ParallelVaeDecoder>> {
        let mut slot = self.parallel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(decoder) = slot.as_ref() {
            return Ok(decoder.clone());
        }
        let decoder = ParallelVaeDecoder::load(self.vb.clone(), &self.config)
            .map_err(|e| self.weights_error(e.into()))?;
        let decoder = Arc::new(decoder);
        *slot = Some(decoder.clone());
        Ok(decoder)
    }

    /// What diffusers' PixArt-α/Σ pipelines do with the final latents:
    /// `vae.decode(latents / scaling_factor)`, an image in [-1, 1] space (unclamped),
    /// (B, latent_channels, h, w) -> (B, 3, h * f, w * f). `shift_factor` is not applied,
    /// exactly as in those pipelines.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&self.unscaled(latents)?)
    }
}

/// A weights backend that checks each weight a model asks for against the real one (present,
/// that shape) and hands back a stand-in that holds one element (a broadcast zero), so a
/// model can be built to check a checkpoint without keeping its weights.
struct ShapeCheck(VarBuilder<'static>);

impl SimpleBackend for ShapeCheck {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // Read one tensor at a time and let it go: at most one weight is held at once.
        drop(self.0.get_with_hints_dtype(s.clone(), name, h, dtype)?);
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self.0.get_unchecked_dtype(name, dtype)?.shape().clone();
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}
