//! xfuser: parallel inference for diffusion transformers. This crate re-exports the workspace
//! and carries the `xfuser` command-line tool with its bundled tiny model.

pub mod bundled;

pub use xfuser_core as core;
pub use xfuser_layers as layers;
pub use xfuser_pipelines as pipelines;
pub use xfuser_schedulers as schedulers;
pub use xfuser_transformers as transformers;
