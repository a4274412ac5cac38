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

/// How the ranks of a local run share the machine's compute threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RankThreads {
    /// Every rank computes on a rayon pool of its own with an equal share of the global
    /// pool's threads (at least one), as if each rank were a device: a rank's matrix products
    /// and kernels never queue behind another rank's tasks, and no rank spins waiting for
    /// threads busy with its peer's work. On 2 cores this took a Ulysses world-2 loop from
    /// 1.11 to 1.00 × the serial loop (docs/performance.md).
    #[default]
    Split,
    /// Every rank runs its parallel work on the global rayon pool.
    Shared,
    /// Every rank computes on a pool of its own of this many threads.
    Each(usize),
}

impl RankThreads {
    /// Threads of each rank's own pool for a world of `world` ranks; None: the global pool.
    pub fn per_rank(self, world: usize) -> Option<usize> {
        match self {
            Self::Split => Some((rayon::current_num_threads() / world.max(1)).max(1)),
            Self::Shared => None,
            Self::Each(n) => Some(n.max(1)),
        }
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
    /// Which threads the ranks compute on.
    pub threads: RankThreads,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            stats: CommStats::new(),
            stack_size: 16 << 20,
            threads: RankThreads::default(),
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

/// A rank's own compute threads; `f` runs on one of them, so every rayon task it starts
/// (candle's matrix products, the fused kernels) stays in this pool.
fn rank_pool(rank: usize, threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("xfuser-rank-{rank}-{i}"))
        .build()
        .map_err(|e| {
            Error::invalid(format!(
                "could not start the {threads} compute threads of rank {rank}: {e}"
            ))
        })
}

/// Runs `f` on one thread per rank of `mesh` and returns the results in rank order. Each
/// rank computes on the threads `options.threads` gives it (by default a pool of its own with
/// an equal share of the cores).
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
            let threads = options.threads.per_rank(mesh.world_size());
            let spawned = std::thread::Builder::new()
                .name(format!("xfuser-rank-{rank}"))
                .stack_size(options.stack_size)
                .spawn_scoped(scope, move || {
                    let run = || match threads {
                        Some(n) => rank_pool(rank, n)?.install(|| f(ctx)),
                        None => f(ctx),
                    };
                    match catch_unwind(AssertUnwindSafe(run)) {
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
