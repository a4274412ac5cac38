//! xfuser-core: what every other xfuser crate builds on — errors, configuration files, the
//! registry, the torch-compatible random generator and the interfaces between backbones,
//! schedulers, attention processors and the runtime.

pub mod alloc;
pub mod attention;
pub mod backbone;
pub mod classifier;
pub mod config;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod pipeline;
pub mod random;
pub mod registry;
pub mod scheduler;
pub mod testing;
pub mod weights;

pub use error::{Error, Result};

// Re-exported so that registering crates use the same inventory as the registry.
pub use inventory;
