//! One generation request as the user gives it, shared by `xfuser generate` (flags) and
//! `xfuser serve` (JSON bodies): the defaults, the conversion into the engine's
//! [`InputConfig`] and the checks made before any model work, so that both front ends accept
//! and refuse the same requests with the same messages.

use xfuser_core::engine::{InputConfig, OutputType};
use xfuser_core::Result;

/// Height and width must be multiples of this before the model is known (the VAE's scale
/// factor); the pipeline checks its own patch grid when it runs.
pub const SIZE_MULTIPLE: usize = 8;
pub const DEFAULT_NUM_INFERENCE_STEPS: usize = 20;
pub const DEFAULT_GUIDANCE_SCALE: f64 = 4.5;
pub const DEFAULT_SEED: u64 = 42;

/// What one request asks for, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    /// None: the model's default.
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    /// diffusers' `true_cfg_scale` (Flux: classifier-free guidance with a negative prompt only
    /// above 1).
    pub true_cfg_scale: f64,
    pub num_images_per_prompt: usize,
    pub seed: u64,
    pub output_type: OutputType,
    /// None: the pipeline's default.
    pub max_sequence_length: Option<usize>,
    pub use_resolution_binning: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            negative_prompt: String::new(),
            height: None,
            width: None,
            num_inference_steps: DEFAULT_NUM_INFERENCE_STEPS,
            guidance_scale: DEFAULT_GUIDANCE_SCALE,
            true_cfg_scale: 1.0,
            num_images_per_prompt: 1,
            seed: DEFAULT_SEED,
            output_type: OutputType::Pil,
            max_sequence_length: None,
            use_resolution_binning: true,
        }
    }
}

impl GenerateParams {
    /// The engine's request, checked as far as it can be without the model. The error's
    /// message is the one-line text both the CLI and the server report.
    pub fn into_input(self) -> Result<InputConfig> {
        let input = InputConfig {
            prompts: self.prompts,
            negative_prompt: self.negative_prompt,
            height: self.height,
            width: self.width,
            num_inference_steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
            true_cfg_scale: self.true_cfg_scale,
            num_images_per_prompt: self.num_images_per_prompt,
            seed: self.seed,
            output_type: self.output_type,
            max_sequence_length: self.max_sequence_length,
            use_resolution_binning: self.use_resolution_binning,
            latents: None,
        };
        input.validate(SIZE_MULTIPLE)?;
        Ok(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_engines() {
        let engine = InputConfig::default();
        let ours = GenerateParams {
            prompts: vec!["a cat".into()],
            ..Default::default()
        }
        .into_input()
        .unwrap();
        assert_eq!(ours.num_inference_steps, engine.num_inference_steps);
        assert_eq!(ours.guidance_scale, engine.guidance_scale);
        assert_eq!(ours.seed, engine.seed);
        assert_eq!(ours.use_resolution_binning, engine.use_resolution_binning);
    }

    #[test]
    fn refusals_name_the_flag() {
        let err = GenerateParams::default().into_input().unwrap_err();
        assert!(err.to_string().contains("--prompt"), "{err}");
        let err = GenerateParams {
            prompts: vec!["a cat".into()],
            height: Some(60),
            ..Default::default()
        }
        .into_input()
        .unwrap_err();
        assert!(err.to_string().contains("--height 60"), "{err}");
    }
}
