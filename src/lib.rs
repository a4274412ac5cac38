//! xfuser: parallel inference for diffusion transformers. This crate re-exports the workspace
//! and carries the `xfuser` command line ([`cli::main`], which plugin binaries call too) with its bundled tiny model, the request handling
//! the CLI and the HTTP server share, and the server itself.

pub mod bundled;
pub mod cli;
pub mod request;
pub mod serve;

pub use xfuser_core as core;
pub use xfuser_layers as layers;
#[cfg(feature = "mpi")]
pub use xfuser_mpi as mpi;
pub use xfuser_pipelines as pipelines;
pub use xfuser_schedulers as schedulers;
pub use xfuser_transformers as transformers;
