//! What a run is configured with, as xDiT splits it: the engine (model, numerics, parallel
//! degrees) fixed when a pipeline is built, and the input (prompts, size, steps, seed) given
//! to each generation. Both are validated once, before any work, with messages that say what
//! to change.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Which model and with what numerics.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// A diffusers pipeline folder or a Hugging Face Hub id.
    pub model: String,
    pub dtype: DType,
    pub device: Device,
}

/// Degrees of the parallel methods (their product is the number of ranks) and PipeFusion's
/// settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelConfig {
    pub data_parallel_degree: usize,
    pub use_cfg_parallel: bool,
    pub pipefusion_parallel_degree: usize,
    pub ulysses_degree: usize,
    pub ring_degree: usize,
    pub tensor_parallel_degree: usize,
    /// PipeFusion: patches the latent image is cut into (M); None: the PipeFusion degree.
    pub num_pipeline_patch: Option<usize>,
    /// PipeFusion: the first steps, run synchronously on the whole image (at least 1: they
    /// fill the stale K/V buffers). With warmup ≥ steps the result equals the serial run.
    pub warmup_steps: usize,
    /// PipeFusion: transformer blocks per stage, in stage order (summing to the model's
    /// layers); None: an even split, the first stages one more when it does not divide.
    pub attn_layer_num_for_pp: Option<Vec<usize>>,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            data_parallel_degree: 1,
            use_cfg_parallel: false,
            pipefusion_parallel_degree: 1,
            ulysses_degree: 1,
            ring_degree: 1,
            tensor_parallel_degree: 1,
            num_pipeline_patch: None,
            warmup_steps: 1,
            attn_layer_num_for_pp: None,
        }
    }
}

impl ParallelConfig {
    pub fn cfg_degree(&self) -> usize {
        if self.use_cfg_parallel {
            2
        } else {
            1
        }
    }

    /// dp · cfg · pp · ulysses · ring · tp.
    pub fn world_size(&self) -> usize {
        self.data_parallel_degree
            * self.cfg_degree()
            * self.pipefusion_parallel_degree
            * self.ulysses_degree
            * self.ring_degree
            * self.tensor_parallel_degree
    }

    pub fn is_serial(&self) -> bool {
        self.world_size() == 1
    }

    /// The number of PipeFusion patches: `num_pipeline_patch`, or the PipeFusion degree.
    pub fn pipeline_patches(&self) -> usize {
        self.num_pipeline_patch
            .unwrap_or(self.pipefusion_parallel_degree)
    }

    /// Degrees must be at least 1 and PipeFusion's settings must fit its degree. Checks that
    /// need the model (whether it supports tensor parallelism, heads divisible by the tensor-
    /// parallel and Ulysses degrees, CFG parallel
    /// needing guidance, stage sizes summing to the layers) come later, from
    /// [`crate::distributed::RankMesh::validate_for_model`] and
    /// [`crate::backbone::stage_layer_ranges`], still before any work.
    pub fn validate(&self) -> Result<()> {
        let degrees = [
            ("--data-parallel-degree", self.data_parallel_degree),
            (
                "--pipefusion-parallel-degree",
                self.pipefusion_parallel_degree,
            ),
            ("--ulysses-degree", self.ulysses_degree),
            ("--ring-degree", self.ring_degree),
            ("--tensor-parallel-degree", self.tensor_parallel_degree),
        ];
        if let Some((flag, _)) = degrees.iter().find(|(_, d)| *d == 0) {
            return Err(Error::invalid(format!("{flag} must be at least 1")));
        }
        self.validate_pipefusion()?;
        Ok(())
    }

    fn validate_pipefusion(&self) -> Result<()> {
        let pp = self.pipefusion_parallel_degree;
        if self.num_pipeline_patch == Some(0) {
            return Err(Error::invalid("--num-pipeline-patch must be at least 1"));
        }
        if pp > 1 && self.warmup_steps == 0 {
            return Err(Error::invalid(
                "--warmup-steps must be at least 1 with --pipefusion-parallel-degree > 1: the \
                 first step fills the K/V buffers that later patches read",
            ));
        }
        if let Some(counts) = &self.attn_layer_num_for_pp {
            if counts.len() != pp {
                return Err(Error::invalid(format!(
                    "--attn-layer-num-for-pp gives {} stage sizes ({counts:?}) but \
                     --pipefusion-parallel-degree is {pp}: give one per stage",
                    counts.len()
                )));
            }
            if counts.contains(&0) {
                return Err(Error::invalid(format!(
                    "--attn-layer-num-for-pp {counts:?}: every stage needs at least one block"
                )));
            }
        }
        Ok(())
    }
}

/// How the ranks of a parallel run behave.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// How long a rank waits in a collective for its peers before failing the run.
    pub comm_timeout: std::time::Duration,
    /// For testing failure handling: rank `.0` fails with an error when it reaches denoising
    /// step `.1` (1-based). Every other rank must then return an error, never hang.
    pub inject_failure: Option<(usize, usize)>,
    /// Test aid for PipeFusion: patches attend to zeros instead of the other patches' stale
    /// K/V, the baseline that the stale-KV approximation is measured against. Never set it
    /// for real runs.
    pub pipefusion_zero_stale_kv: bool,
    /// Skip transformer work on steps where it barely changes (`--use-fbcache`,
    /// `--use-teacache`); None: off.
    pub step_cache: Option<StepCache>,
    /// `--use-parallel-vae`: after the denoising loop every rank of the world takes part in
    /// the VAE decode, each decoding a band of the image's rows (so each holds about 1/N of
    /// the decode's activations); off: the lead rank of each data-parallel group decodes its
    /// images alone. No effect on a serial run. It is here rather than in [`ParallelConfig`]
    /// (as in xDiT's `RuntimeConfig`) because it adds no rank and changes no degree: it is how
    /// the ranks of the mesh spend the decode.
    pub use_parallel_vae: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            comm_timeout: std::time::Duration::from_secs(300),
            inject_failure: None,
            pipefusion_zero_stale_kv: false,
            step_cache: None,
            use_parallel_vae: false,
        }
    }
}

/// A step cache: which kind and its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCache {
    pub kind: StepCacheKind,
    /// The relative change below which a step reuses the cached work (0: never).
    pub threshold: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepCacheKind {
    /// First-Block-Cache: run the first block; when its residual changed by less than the
    /// threshold (relative L1) since the last fully computed step, add the cached residual of
    /// the other blocks instead of running them.
    FirstBlock,
    /// TeaCache: sum the relative L1 change of the first block's timestep-modulated input from
    /// step to step (rescaled by the model's polynomial where one is known); while the sum
    /// stays below the threshold, add the cached residual of all the blocks instead of running
    /// them. The first and last steps always run.
    TeaCache,
}

impl StepCacheKind {
    /// The command-line flag that turns it on.
    pub fn flag(self) -> &'static str {
        match self {
            Self::FirstBlock => "--use-fbcache",
            Self::TeaCache => "--use-teacache",
        }
    }
}

impl StepCache {
    /// xDiT's default threshold for both its caches (`rel_l1_thresh` 0.12 in its examples).
    pub const DEFAULT_THRESHOLD: f64 = 0.12;
}

/// Everything fixed when a pipeline is built.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model: ModelConfig,
    pub runtime: RuntimeConfig,
    pub parallel: ParallelConfig,
}

impl EngineConfig {
    /// A serial f32 CPU engine for `model`.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: ModelConfig {
                model: model.into(),
                dtype: DType::F32,
                device: Device::Cpu,
            },
            runtime: RuntimeConfig::default(),
            parallel: ParallelConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    /// Decoded 8-bit RGB images.
    Pil,
    /// The final latents, not decoded.
    Latent,
}

/// One generation request, named as diffusers' pipeline call arguments.
#[derive(Debug, Clone)]
pub struct InputConfig {
    pub prompts: Vec<String>,
    /// One negative prompt for every prompt ("" as diffusers' default).
    pub negative_prompt: String,
    /// None: the model's default (sample_size · vae scale factor).
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    /// diffusers' `true_cfg_scale` (Flux): classifier-free guidance with the negative
    /// prompt at this scale, used only when it is above 1 and `negative_prompt` is not
    /// empty (then the pipeline runs a CFG batch); 1.0, the default, turns it off. Flux's
    /// `guidance_scale` is its embedded guidance instead. Other pipelines ignore it.
    pub true_cfg_scale: f64,
    pub num_images_per_prompt: usize,
    pub seed: u64,
    pub output_type: OutputType,
    /// None: the pipeline's default (120 for PixArt-α, 300 for PixArt-Σ).
    pub max_sequence_length: Option<usize>,
    pub use_resolution_binning: bool,
    /// Initial noise to use instead of drawing it from the seed, (B, C, H/8, W/8).
    pub latents: Option<Tensor>,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            negative_prompt: String::new(),
            height: None,
            width: None,
            num_inference_steps: 20,
            guidance_scale: 4.5,
            true_cfg_scale: 1.0,
            num_images_per_prompt: 1,
            seed: 42,
            output_type: OutputType::Pil,
            max_sequence_length: None,
            use_resolution_binning: true,
            latents: None,
        }
    }
}

impl InputConfig {
    /// Checks what can be checked without the model; `multiple` is the size the height and
    /// width must be divisible by (the VAE scale factor times the patch size).
    pub fn validate(&self, multiple: usize) -> Result<()> {
        if self.prompts.is_empty() {
            return Err(Error::invalid(
                "no prompt given: pass at least one --prompt",
            ));
        }
        if self.num_inference_steps == 0 {
            return Err(Error::invalid("--num-inference-steps must be at least 1"));
        }
        if self.num_images_per_prompt == 0 {
            return Err(Error::invalid("--num-images-per-prompt must be at least 1"));
        }
        if !self.guidance_scale.is_finite() {
            return Err(Error::invalid("--guidance-scale must be a finite number"));
        }
        if !self.true_cfg_scale.is_finite() {
            return Err(Error::invalid("--true-cfg-scale must be a finite number"));
        }
        for (name, value) in [("--height", self.height), ("--width", self.width)] {
            if let Some(v) = value {
                if v == 0 || v % multiple != 0 {
                    return Err(Error::invalid(format!(
                        "{name} {v} must be a positive multiple of {multiple}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// What a pipeline returns: always the final latents, and the images unless latents were asked
/// for.
#[derive(Debug, Clone)]
pub struct PipelineOutput {
    /// (B, C, H/8, W/8)
    pub latents: Tensor,
    pub images: Vec<RgbImage>,
    /// What the ranks sent to each other, per group and op (parallel runs only).
    pub comm_stats: Option<crate::distributed::CommStats>,
    /// With a step cache: how many of the denoising steps ran the whole transformer (of the
    /// first data-parallel group).
    pub cache_stats: Option<CacheStats>,
}

/// Transformer steps a step cache computed fully, of all steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub computed: usize,
    pub steps: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> InputConfig {
        InputConfig {
            prompts: vec!["a cat".into()],
            ..Default::default()
        }
    }

    #[test]
    fn input_validation_names_the_flag() {
        assert!(input().validate(8).is_ok());
        let bad = |f: fn(&mut InputConfig)| {
            let mut i = input();
            f(&mut i);
            i.validate(8).unwrap_err().to_string()
        };
        assert!(bad(|i| i.prompts.clear()).contains("--prompt"));
        assert!(bad(|i| i.num_inference_steps = 0).contains("--num-inference-steps"));
        assert!(bad(|i| i.height = Some(100)).contains("--height 100"));
        assert!(bad(|i| i.width = Some(0)).contains("--width"));
    }

    #[test]
    fn pipefusion_settings_are_checked() {
        let pp = |f: fn(&mut ParallelConfig)| {
            let mut p = ParallelConfig {
                pipefusion_parallel_degree: 2,
                ..Default::default()
            };
            f(&mut p);
            p.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(pp(|_| {}), "");
        assert_eq!(pp(|p| p.num_pipeline_patch = Some(8)), "");
        assert!(pp(|p| p.num_pipeline_patch = Some(0)).contains("--num-pipeline-patch"));
        assert!(pp(|p| p.warmup_steps = 0).contains("--warmup-steps"));
        assert!(pp(|p| p.attn_layer_num_for_pp = Some(vec![1, 1, 1])).contains("one per stage"));
        assert!(pp(|p| p.attn_layer_num_for_pp = Some(vec![2, 0])).contains("at least one"));
        assert_eq!(pp(|p| p.attn_layer_num_for_pp = Some(vec![3, 1])), "");
        assert_eq!(ParallelConfig::default().pipeline_patches(), 1);
    }

    #[test]
    fn zero_degrees_are_refused() {
        assert!(ParallelConfig::default().validate().is_ok());
        let p = ParallelConfig {
            ulysses_degree: 2,
            pipefusion_parallel_degree: 2,
            ..Default::default()
        };
        assert_eq!(p.world_size(), 4);
        assert!(p.validate().is_ok());
        let tp = ParallelConfig {
            tensor_parallel_degree: 2,
            ulysses_degree: 2,
            ..Default::default()
        };
        assert_eq!(tp.world_size(), 4);
        assert!(tp.validate().is_ok());
        let zero = ParallelConfig {
            ring_degree: 0,
            ..Default::default()
        };
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--ring-degree"));
    }
}
