//! xfuser-layers: building blocks shared by the backbones — embeddings, normalizations and
//! feed-forward layers after diffusers' module of the same name — and, with the distributed
//! runtime, their parallel forms (attention processors, patch-aware embeddings, tensor-parallel
//! linear layers).

pub mod attention_processor;
pub mod embeddings;
pub mod feed_forward;
pub mod normalization;
pub mod pipefusion_attention;
pub mod tensor_parallel;
