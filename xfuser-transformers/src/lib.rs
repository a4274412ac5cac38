//! xfuser-transformers: diffusion-transformer backbones, one file per diffusers model file,
//! each registering itself in the xfuser-core registry.
