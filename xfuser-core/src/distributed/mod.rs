//! The distributed runtime: the rank mesh of the parallel degrees, process groups with their
//! collectives over a pluggable backend, a local (one thread per rank) backend with its
//! launcher, the hook that makes each process of a launched job one rank, and the per-shape
//! runtime state that says how sequences split.
//!
//! ```
//! use xfuser_core::distributed::{launch_local, LaunchOptions, RankMesh};
//! use xfuser_core::engine::ParallelConfig;
//! # fn main() -> xfuser_core::Result<()> {
//! let config = ParallelConfig { ulysses_degree: 2, ..Default::default() };
//! let mesh = RankMesh::new(&config)?;
//! let options = LaunchOptions::default();
//! let ranks = launch_local(&mesh, &options, |ctx| {
//!     let x = candle_core::Tensor::new(&[ctx.rank() as f32], &candle_core::Device::Cpu)?;
//!     let sum = ctx.ulysses_group().all_reduce_sum(&x)?;
//!     Ok(sum.to_vec1::<f32>()?[0])
//! })?;
//! assert_eq!(ranks, vec![1.0, 1.0]);
//! # Ok(())
//! # }
//! ```

mod group;
mod launch;
mod local;
mod mesh;
mod process;
pub mod runtime_state;
mod tp_rank;

pub use group::{
    CommCounts, CommKey, CommOp, CommStats, Communicator, ProcessGroup, RecvHandle, RecvWork,
    SendHandle, SendWork,
};
pub use launch::{launch_local, LaunchOptions, RankContext, RankThreads};
pub use local::{AbortReason, LocalComm, LocalWorld};
pub use mesh::{group_name, Axis, CfgUse, RankCoords, RankMesh};
pub use process::{check_world_size, install_process_world, process_world, ProcessWorld};
pub use runtime_state::{InputMetadata, Patch, RuntimeState, ShapeParams, SpSlice, TokenRange};
pub use tp_rank::TpRank;

#[cfg(test)]
mod tests;
