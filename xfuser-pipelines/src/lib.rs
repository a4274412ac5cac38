//! xfuser-pipelines: pipelines, one file per diffusers pipeline, and the denoising loop they
//! share.

pub mod binning;
pub mod denoise;
pub mod hub;
pub mod image;
pub mod pipefusion;
pub mod pipeline_flux;
pub mod pipeline_pixart_alpha;
pub mod pipeline_pixart_sigma;
pub mod pipeline_stable_diffusion_3;
pub mod pipeline_utils;
pub mod runtime;
pub mod step_cache;
pub mod text;
pub mod vae;

pub use pipeline_flux::xFuserFluxPipeline;
pub use pipeline_pixart_alpha::{xFuserPixArtAlphaPipeline, PixArtPipeline};
pub use pipeline_pixart_sigma::xFuserPixArtSigmaPipeline;
pub use pipeline_stable_diffusion_3::xFuserStableDiffusion3Pipeline;
pub use pipeline_utils::xFuserPipeline;
