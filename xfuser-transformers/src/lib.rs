//! xfuser-transformers: diffusion-transformer backbones, one file per diffusers model file,
//! each registering itself in the xfuser-core registry.

pub mod pixart_transformer_2d;

pub use pixart_transformer_2d::PixArtTransformer2DModel;
