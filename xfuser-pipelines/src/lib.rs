//! xfuser-pipelines: pipelines, one file per diffusers pipeline, and the denoising loop they
//! share.

pub mod binning;
pub mod denoise;
pub mod hub;
pub mod image;
pub mod pipeline_utils;
pub mod text;
pub mod vae;

pub use pipeline_utils::xFuserPipeline;
