//! The local backend: every rank is a thread of this process and groups exchange tensors
//! through shared memory. Tensors are immutable and shared by reference, so a gather is a
//! concatenation of the very bits each rank produced and a sum is computed in member order,
//! identically on every member.
//!
//! Each group has one mutex-protected state and one condition variable:
//! - collectives are numbered per member; call k of every member meets in round k, where each
//!   deposits its tensors and, once all have, reads everybody's;
//! - point-to-point messages go to a mailbox keyed by (src, dst, sequence number): a send
//!   never waits, a receive waits for the message with its ticket.
//!
//! Failure path: the world holds an abort reason (the first one wins) and which ranks have
//! left. A waiter wakes on every change and fails at once when the world is aborted, when a
//! rank it still needs has left, or when its deadline passes. [`LocalWorld::abort`] notifies
//! every group, so every pending op on every rank returns an error within microseconds; the
//! launcher calls it when a rank returns an error or panics.
//!
//! Collectives return tensors on the device of the tensor passed in; a received message stays
//! on the sender's device (the same one for CPU ranks). A receive handle dropped unwaited
//! leaves its message in the mailbox until the world is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::group::{CommOp, CommStats, Communicator, ProcessGroup, RecvWork, SendWork};
use super::mesh::{group_name, Axis, RankMesh};
use crate::{Error, Result};

/// Why the world was aborted, first come.
#[derive(Debug, Clone)]
pub struct AbortReason {
    /// The rank whose failure aborted the world, if one did.
    pub rank: Option<usize>,
    pub message: String,
}

#[derive(Debug)]
struct WorldShared {
    timeout: Duration,
    abort: OnceLock<AbortReason>,
    exited: Vec<AtomicBool>,
    groups: Mutex<Vec<Arc<GroupShared>>>,
}

/// The shared state of a local run: its groups, its timeout and its failure flags.
#[derive(Debug, Clone)]
pub struct LocalWorld {
    shared: Arc<WorldShared>,
}

impl LocalWorld {
    /// A world of `world_size` ranks whose blocking ops give up after `timeout`.
    pub fn new(world_size: usize, timeout: Duration) -> Self {
        Self {
            shared: Arc::new(WorldShared {
                timeout,
                abort: OnceLock::new(),
                exited: (0..world_size).map(|_| AtomicBool::new(false)).collect(),
                groups: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn world_size(&self) -> usize {
        self.shared.exited.len()
    }

    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Creates a group of the global ranks `members` named `name` and returns one
    /// communicator per member, in member order.
    pub fn new_group(&self, name: &str, members: &[usize]) -> Result<Vec<Arc<LocalComm>>> {
        if let Some(&r) = members.iter().find(|&&r| r >= self.world_size()) {
            return Err(Error::invalid(format!(
                "group {name}: rank {r} is not in a world of {} ranks",
                self.world_size()
            )));
        }
        let n = members.len();
        let group = Arc::new(GroupShared {
            name: name.to_string(),
            members: members.to_vec(),
            state: Mutex::new(GroupState {
                next_round: vec![0; n],
                rounds: HashMap::new(),
                next_send: vec![vec![0; n]; n],
                next_recv: vec![vec![0; n]; n],
                mailbox: HashMap::new(),
                broken: None,
            }),
            changed: Condvar::new(),
        });
        lock(&self.shared.groups).push(group.clone());
        Ok((0..n)
            .map(|index| {
                Arc::new(LocalComm {
                    world: self.shared.clone(),
                    group: group.clone(),
                    index,
                })
            })
            .collect())
    }

    /// Makes every pending and future op on every group fail with `message`. Only the first
    /// abort is kept; returns whether this one was it.
    pub fn abort(&self, rank: Option<usize>, message: impl Into<String>) -> bool {
        let first = self
            .shared
            .abort
            .set(AbortReason {
                rank,
                message: message.into(),
            })
            .is_ok();
        self.notify_all();
        first
    }

    /// The reason of the first abort, if any.
    pub fn abort_reason(&self) -> Option<&AbortReason> {
        self.shared.abort.get()
    }

    /// Records that `rank` has finished: ops still waiting for it fail at once instead of
    /// at their timeout.
    pub fn mark_exited(&self, rank: usize) {
        self.shared.exited[rank].store(true, Ordering::SeqCst);
        self.notify_all();
    }

    fn notify_all(&self) {
        let groups = lock(&self.shared.groups).clone();
        for g in groups {
            // Taking the lock orders this notification after any waiter's check of the flags,
            // so no waiter misses it.
            let _state = lock(&g.state);
            g.changed.notify_all();
        }
    }

    /// One [`ProcessGroup`] per rank for every group of `mesh` on `axis` and of the world,
    /// indexed `[rank][axis]`, with the world group last.
    pub fn mesh_groups(
        &self,
        mesh: &RankMesh,
        stats: &CommStats,
    ) -> Result<Vec<Vec<ProcessGroup>>> {
        let world = mesh.world_size();
        let mut per_rank: Vec<Vec<Option<ProcessGroup>>> = vec![vec![None; 8]; world];
        let mut add = |slot: usize, prefix: &str, members: Vec<usize>| -> Result<()> {
            let name = group_name(prefix, &members);
            for (index, comm) in self.new_group(&name, &members)?.into_iter().enumerate() {
                let pg = ProcessGroup::new(&name, members.clone(), index, comm, stats.clone())?;
                per_rank[members[index]][slot] = Some(pg);
            }
            Ok(())
        };
        for (slot, axis) in Axis::ALL.into_iter().enumerate() {
            for members in mesh.groups(axis) {
                add(slot, axis.name(), members)?;
            }
        }
        add(Axis::ALL.len(), "world", (0..world).collect())?;
        Ok(per_rank
            .into_iter()
            .map(|groups| {
                groups
                    .into_iter()
                    .map(|g| g.expect("every slot filled"))
                    .collect()
            })
            .collect())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A rank that panicked while holding a lock leaves consistent state behind (every update
    // is a single insert or remove), and the abort it triggers is what the others must see.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct GroupShared {
    name: String,
    members: Vec<usize>,
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Debug)]
struct GroupState {
    /// The number of collectives each member has entered.
    next_round: Vec<u64>,
    rounds: HashMap<u64, Round>,
    /// Sequence numbers of the next send / posted receive, `[src][dst]`.
    next_send: Vec<Vec<u64>>,
    next_recv: Vec<Vec<u64>>,
    mailbox: HashMap<(usize, usize, u64), Tensor>,
    /// Set by the first failed op: the group's sequence is lost, so later ops fail too.
    broken: Option<String>,
}

#[derive(Debug)]
struct Round {
    op: CommOp,
    /// A parameter that must agree across members (the broadcast root).
    param: usize,
    deposits: Vec<Option<Vec<Tensor>>>,
    readers_left: usize,
    mismatch: Option<String>,
}

/// One member's communicator on a local group.
#[derive(Debug)]
pub struct LocalComm {
    world: Arc<WorldShared>,
    group: Arc<GroupShared>,
    index: usize,
}

impl LocalComm {
    fn err(&self, op: CommOp, message: String) -> Error {
        Error::Comm {
            group: self.group.name.clone(),
            op: op.name(),
            message,
        }
    }

    /// The error to fail with if the world is aborted, the group broken or one of `needed`
    /// (member indices) has left; None to keep waiting.
    fn failure(&self, op: CommOp, state: &GroupState, needed: &[usize]) -> Option<Error> {
        if let Some(reason) = self.world.abort.get() {
            let who = match reason.rank {
                Some(r) => format!("rank {r} failed"),
                None => "the run was aborted".to_string(),
            };
            return Some(self.err(op, format!("{who}: {}", reason.message)));
        }
        if let Some(why) = &state.broken {
            return Some(self.err(op, format!("group broken by an earlier failure: {why}")));
        }
        let gone: Vec<usize> = needed
            .iter()
            .map(|&i| self.group.members[i])
            .filter(|&r| self.world.exited[r].load(Ordering::SeqCst))
            .collect();
        if !gone.is_empty() {
            return Some(self.err(
                op,
                format!("rank(s) {gone:?} finished without joining this op"),
            ));
        }
        None
    }

    /// Waits on the group's condition variable until `ready` gives a value, failing on abort,
    /// on a needed member leaving and at the deadline. `needed` lists the member indices the
    /// op still waits for.
    fn wait_until<T>(
        &self,
        op: CommOp,
        mut state: MutexGuard<'_, GroupState>,
        mut ready: impl FnMut(&mut GroupState) -> Result<Option<T>>,
        needed: impl Fn(&GroupState) -> Vec<usize>,
    ) -> Result<T> {
        let deadline = Instant::now() + self.world.timeout;
        loop {
            match ready(&mut state) {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(e) => {
                    state.broken.get_or_insert_with(|| e.to_string());
                    self.group.changed.notify_all();
                    return Err(e);
                }
            }
            let waiting_for = needed(&state);
            if let Some(e) = self.failure(op, &state, &waiting_for) {
                state.broken.get_or_insert_with(|| e.to_string());
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                let ranks: Vec<usize> =
                    waiting_for.iter().map(|&i| self.group.members[i]).collect();
                let e = Error::CommTimeout {
                    group: self.group.name.clone(),
                    op: op.name(),
                    timeout: self.world.timeout,
                    message: format!("still waiting for rank(s) {ranks:?}"),
                };
                state.broken.get_or_insert_with(|| e.to_string());
                return Err(e);
            }
            state = self
                .group
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Deposits `payload` for this member's next collective and returns every member's
    /// payload, in member order, once all have deposited.
    fn collective(
        &self,
        op: CommOp,
        param: usize,
        payload: Vec<Tensor>,
    ) -> Result<Vec<Vec<Tensor>>> {
        let n = self.group.members.len();
        let mut state = lock(&self.group.state);
        if let Some(e) = self.failure(op, &state, &[]) {
            return Err(e);
        }
        let seq = state.next_round[self.index];
        state.next_round[self.index] += 1;
        let round = state.rounds.entry(seq).or_insert_with(|| Round {
            op,
            param,
            deposits: vec![None; n],
            readers_left: n,
            mismatch: None,
        });
        if (round.op, round.param) != (op, param) && round.mismatch.is_none() {
            round.mismatch = Some(format!(
                "collective #{seq}: rank {} called {op} (param {param}) while another member \
                 called {} (param {})",
                self.group.members[self.index], round.op, round.param
            ));
        }
        round.deposits[self.index] = Some(payload);
        self.group.changed.notify_all();
        let me = self.group.members[self.index];
        self.wait_until(
            op,
            state,
            |state| {
                let round = state.rounds.get_mut(&seq).expect("round lives until read");
                if let Some(m) = &round.mismatch {
                    return Err(self.err(op, m.clone()));
                }
                if round.deposits.iter().any(Option::is_none) {
                    return Ok(None);
                }
                let all: Vec<Vec<Tensor>> = round.deposits.iter().flatten().cloned().collect();
                round.readers_left -= 1;
                if round.readers_left == 0 {
                    state.rounds.remove(&seq);
                }
                Ok(Some(all))
            },
            |state| match state.rounds.get(&seq) {
                Some(round) => (0..n).filter(|&i| round.deposits[i].is_none()).collect(),
                None => Vec::new(),
            },
        )
        .map_err(|e| match e {
            Error::Comm { group, op, message } => Error::Comm {
                group,
                op,
                message: format!("{message} (at rank {me}, collective #{seq})"),
            },
            other => other,
        })
    }

    /// Checks that every member passed tensors of one shape and dtype.
    fn check_same_layout(&self, op: CommOp, all: &[Vec<Tensor>]) -> Result<()> {
        let first = &all[0];
        for (i, tensors) in all.iter().enumerate().skip(1) {
            let same = tensors.len() == first.len()
                && tensors
                    .iter()
                    .zip(first)
                    .all(|(a, b)| a.dims() == b.dims() && a.dtype() == b.dtype());
            if !same {
                let describe = |ts: &Vec<Tensor>| -> Vec<String> {
                    ts.iter()
                        .map(|t| format!("{:?} {:?}", t.dtype(), t.dims()))
                        .collect()
                };
                return Err(self.err(
                    op,
                    format!(
                        "members disagree on the tensors: rank {} passed {:?}, rank {} passed {:?}",
                        self.group.members[0],
                        describe(first),
                        self.group.members[i],
                        describe(tensors)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The tensor on `device` (a no-op on the device it is on).
fn on(device: &Device, t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(device)?)
}

impl Communicator for LocalComm {
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let op = CommOp::AllReduceSum;
        let all = self.collective(op, 0, vec![tensor.clone()])?;
        self.check_same_layout(op, &all)?;
        let device = tensor.device();
        let mut sum = on(device, &all[0][0])?;
        for t in &all[1..] {
            sum = sum.add(&on(device, &t[0])?)?;
        }
        Ok(sum)
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let op = CommOp::AllGather;
        let all = self.collective(op, 0, vec![tensor.clone()])?;
        self.check_same_layout(op, &all)?;
        all.iter().map(|t| on(tensor.device(), &t[0])).collect()
    }

    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let op = CommOp::AllToAll;
        let n = self.group.members.len();
        if chunks.len() != n {
            return Err(self.err(
                op,
                format!("{} chunks passed for a group of {n}", chunks.len()),
            ));
        }
        let device = chunks[0].device().clone();
        let all = self.collective(op, 0, chunks)?;
        self.check_same_layout(op, &all)?;
        all.iter()
            .map(|from| on(&device, &from[self.index]))
            .collect()
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        let op = CommOp::Broadcast;
        let all = self.collective(op, root, vec![tensor.clone()])?;
        // Non-roots' tensors only describe the shape; they must match the root's.
        self.check_same_layout(op, &all)?;
        on(tensor.device(), &all[root][0])
    }

    fn isend(&self, tensor: &Tensor, dst: usize) -> Result<Box<dyn SendWork>> {
        let op = CommOp::Send;
        let mut state = lock(&self.group.state);
        if let Some(e) = self.failure(op, &state, &[]) {
            return Err(e);
        }
        let seq = state.next_send[self.index][dst];
        state.next_send[self.index][dst] += 1;
        state.mailbox.insert((self.index, dst, seq), tensor.clone());
        self.group.changed.notify_all();
        Ok(Box::new(LocalSendDone))
    }

    fn irecv(&self, src: usize) -> Result<Box<dyn RecvWork>> {
        let op = CommOp::Recv;
        let mut state = lock(&self.group.state);
        if let Some(e) = self.failure(op, &state, &[]) {
            return Err(e);
        }
        let ticket = state.next_recv[src][self.index];
        state.next_recv[src][self.index] += 1;
        Ok(Box::new(LocalRecv {
            comm: LocalComm {
                world: self.world.clone(),
                group: self.group.clone(),
                index: self.index,
            },
            key: (src, self.index, ticket),
        }))
    }

    fn barrier(&self) -> Result<()> {
        self.collective(CommOp::Barrier, 0, Vec::new())?;
        Ok(())
    }
}

/// Local sends complete when posted: the tensor is in the receiver's mailbox.
struct LocalSendDone;

impl SendWork for LocalSendDone {
    fn wait(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

struct LocalRecv {
    comm: LocalComm,
    key: (usize, usize, u64),
}

impl RecvWork for LocalRecv {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        let comm = &self.comm;
        let key = self.key;
        let state = lock(&comm.group.state);
        comm.wait_until(
            CommOp::Recv,
            state,
            |state| Ok(state.mailbox.remove(&key)),
            |_| vec![key.0],
        )
    }
}
