//! One process per rank over MPI: `mpirun -n N xfuser generate ...` (or `srun` under Slurm)
//! starts N processes, and each becomes one rank of the mesh. Built only with the `mpi`
//! feature; without it this crate is empty, and the ranks of a parallel run are threads.

#[cfg(feature = "mpi")]
mod backend;

#[cfg(feature = "mpi")]
pub use backend::{init_from_env, init_from_env_on, launched_by_mpi, MpiComm, MpiWorld};

/// Process groups as NCCL communicators, for ranks on CUDA devices (the `nccl` feature).
#[cfg(feature = "nccl")]
pub mod nccl;
