//! xfuser: parallel inference for diffusion transformers. This crate re-exports the workspace.

pub use xfuser_core as core;
pub use xfuser_layers as layers;
pub use xfuser_pipelines as pipelines;
pub use xfuser_schedulers as schedulers;
pub use xfuser_transformers as transformers;
