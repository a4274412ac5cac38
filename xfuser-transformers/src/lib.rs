//! xfuser-transformers: diffusion-transformer backbones, one file per diffusers model file,
//! and image classifiers (transformers' ViT), each registering itself in the xfuser-core
//! registry.

pub mod backbone_common;
pub mod pixart_transformer_2d;
pub mod transformer_flux;
pub mod transformer_sd3;
pub mod vit;

pub use pixart_transformer_2d::PixArtTransformer2DModel;
pub use transformer_flux::FluxTransformer2DModel;
pub use transformer_sd3::SD3Transformer2DModel;
pub use vit::ViTForImageClassification;
