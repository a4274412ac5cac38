//! Running a closure on every rank of a mesh: one thread per rank over the local backend.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use super::group::{CommStats, ProcessGroup};
use super::local::LocalWorld;
use super::mesh::{Axis, RankCoords, RankMesh};
use crate::{Error, Result};

/// What a rank sees of the run: who it is and its process groups.
#[derive(Debug, Clone)]
pub struct RankContext {
    rank: usize,
    mesh: RankMesh,
    /// One per [`Axis::ALL`] entry, then the world group.
    groups: Vec<ProcessGroup>,
    stats: CommStats,
}

impl RankContext {
    /// `groups` holds one group per [`Axis::ALL`] entry, in that order, then the world group.
    pub fn new(rank: usize, mesh: RankMesh, groups: Vec<ProcessGroup>, stats: CommStats) -> Self {
        assert_eq!(
            groups.len(),
            Axis::ALL.len() + 1,
            "one group per axis and the world"
        );
        Self {
            rank,
            mesh,
            groups,
            stats,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.mesh.world_size()
    }

    pub fn mesh(&self) -> &RankMesh {
        &self.mesh
    }

    pub fn coords(&self) -> RankCoords {
        self.mesh.coords(self.rank)
    }

    /// The group of ranks that differ from this one only on `axis`.
    pub fn group(&self, axis: Axis) -> &ProcessGroup {
        let slot = Axis::ALL.iter().position(|&a| a == axis).expect("in ALL");
        &self.groups[slot]
    }

    pub fn world(&self) -> &ProcessGroup {
        &self.groups[Axis::ALL.len()]
    }

    pub fn dp_group(&self) -> &ProcessGroup {
        self.group(Axis::Dp)
    }

    pub fn cfg_group(&self) -> &ProcessGroup {
        self.group(Axis::Cfg)
    }

    pub fn pp_group(&self) -> &ProcessGroup {
        self.group(Axis::Pp)
    }

    pub fn sp_group(&self) -> &ProcessGroup {
        self.group(Axis::Sp)
    }

    pub fn ulysses_group(&self) -> &ProcessGroup {
        self.group(Axis::Ulysses)
    }

    pub fn ring_group(&self) -> &ProcessGroup {
        self.group(Axis::Ring)
    }

    pub fn tp_group(&self) -> &ProcessGroup {
        self.group(Axis::Tp)
    }

    /// The counters every group of the run writes to.
    pub fn comm_stats(&self) -> &CommStats {
        &self.stats
    }
}

/// How [`launch_local`] runs.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// How long a blocking op waits for its peers before failing.
    pub timeout: Duration,
    /// Where the groups count their traffic; keep a clone to read it after the run.
    pub stats: CommStats,
    /// Stack size of each rank's thread.
    pub stack_size: usize,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            stats: CommStats::new(),
            stack_size: 16 << 20,
        }
    }
}

impl LaunchOptions {
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }
}

enum Outcome<T> {
    Done(T),
    Failed(Error),
    Panicked(String),
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".to_string()
    }
}

/// Runs `f` on one thread per rank of `mesh` and returns the results in rank order.
///
/// When a rank returns an error or panics, the world is aborted: every op pending or later
/// called on any group fails at once, so all ranks return. The error returned is the root
/// cause, the failure of the first rank that aborted the run, not its peers' "rank r failed"
/// echoes. A rank that returns while peers still wait for it in an op makes those ops fail at
/// once too.
pub fn launch_local<T, F>(mesh: &RankMesh, options: &LaunchOptions, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(RankContext) -> Result<T> + Send + Sync,
{
    let world = LocalWorld::new(mesh.world_size(), options.timeout);
    let groups = world.mesh_groups(mesh, &options.stats)?;
    let contexts: Vec<RankContext> = groups
        .into_iter()
        .enumerate()
        .map(|(rank, groups)| RankContext::new(rank, *mesh, groups, options.stats.clone()))
        .collect();

    let outcomes: Vec<Outcome<T>> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for ctx in contexts {
            let rank = ctx.rank();
            let (world, f) = (&world, &f);
            let spawned = std::thread::Builder::new()
                .name(format!("xfuser-rank-{rank}"))
                .stack_size(options.stack_size)
                .spawn_scoped(scope, move || {
                    match catch_unwind(AssertUnwindSafe(|| f(ctx))) {
                        Ok(Ok(value)) => {
                            world.mark_exited(rank);
                            Outcome::Done(value)
                        }
                        Ok(Err(e)) => {
                            world.abort(Some(rank), e.to_string());
                            Outcome::Failed(e)
                        }
                        Err(payload) => {
                            let message = panic_message(payload.as_ref());
                            world.abort(Some(rank), format!("panicked: {message}"));
                            Outcome::Panicked(message)
                        }
                    }
                })
                .map_err(|e| {
                    let message = format!("could not start the thread of rank {rank}: {e}");
                    world.abort(None, message.clone());
                    Error::invalid(message)
                });
            handles.push(spawned);
        }
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|p| Outcome::Panicked(panic_message(p.as_ref()))),
                Err(e) => Outcome::Failed(e),
            })
            .collect()
    });

    let root = world.abort_reason().map(|r| r.rank);
    let mut values = Vec::with_capacity(outcomes.len());
    let mut first_error = None;
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let error = match outcome {
            Outcome::Done(value) => {
                values.push(value);
                continue;
            }
            Outcome::Failed(e) => e,
            Outcome::Panicked(message) => Error::RankPanicked { rank, message },
        };
        if root == Some(Some(rank)) {
            return Err(error);
        }
        first_error.get_or_insert(error);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(values),
    }
}
