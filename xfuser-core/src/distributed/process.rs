//! Ranks that are processes: the hook through which a launcher such as `mpirun` makes each
//! process of a job one rank of the mesh.
//!
//! The runtime runs the ranks of a parallel configuration as threads of one process
//! ([`super::launch_local`]) unless a [`ProcessWorld`] is installed. A binary built with a
//! process backend (the `xfuser` binary's `mpi` feature) installs one at start-up when it finds
//! itself started by a launcher; from then on this process *is* one rank: it loads only what
//! its rank needs, builds its process groups over the backend, and runs its own share of the
//! work. The trait sits here, free of any MPI dependency, so that the runtime and the plugin
//! crates build the same with or without the backend.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use super::group::CommStats;
use super::launch::RankContext;
use super::mesh::RankMesh;
use crate::{Error, Result};

/// The world of processes this process belongs to.
pub trait ProcessWorld: Send + Sync + fmt::Debug {
    /// The backend's name, for messages ("MPI").
    fn backend(&self) -> &str;

    /// This process's rank in the world, 0..size.
    fn rank(&self) -> usize;

    /// The number of processes in the world.
    fn size(&self) -> usize;

    /// This process's rank context on `mesh`: one group per axis and the world group, built
    /// over the backend. Collective: every process of the world calls it with the same mesh.
    /// Blocking ops of the groups fail after `timeout`.
    fn rank_context(
        &self,
        mesh: &RankMesh,
        stats: &CommStats,
        timeout: Duration,
    ) -> Result<RankContext>;

    /// Ends every process of the world with `code` (the process calling it included).
    fn abort(&self, code: i32) -> !;
}

static WORLD: OnceLock<Box<dyn ProcessWorld>> = OnceLock::new();

/// Makes this process a rank of `world` for the rest of its life. Only one world can be
/// installed.
pub fn install_process_world(world: Box<dyn ProcessWorld>) -> Result<()> {
    WORLD.set(world).map_err(|w| {
        Error::invalid(format!(
            "a {} process world is already installed; a process joins one world",
            w.backend()
        ))
    })
}

/// The installed process world, if this process was started as one rank of several.
pub fn process_world() -> Option<&'static dyn ProcessWorld> {
    WORLD.get().map(|w| w.as_ref())
}

/// Checks that a mesh of `mesh_size` ranks fits the installed process world (one process per
/// rank), before any weights load. Without a world, any size runs as threads.
pub fn check_world_size(mesh_size: usize) -> Result<()> {
    let Some(world) = process_world() else {
        return Ok(());
    };
    if world.size() != mesh_size {
        return Err(Error::invalid(format!(
            "the parallel degrees multiply to {mesh_size} rank{} (data × cfg × pipefusion × \
             ulysses × ring × tensor), but {} started {} process{}; give the launcher -n \
             {mesh_size} or change the degrees",
            if mesh_size == 1 { "" } else { "s" },
            world.backend(),
            world.size(),
            if world.size() == 1 { "" } else { "es" },
        )));
    }
    Ok(())
}
