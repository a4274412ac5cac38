//! Process groups: the collectives and point-to-point ops that the parallel layers call, one
//! backend trait under them, and the byte counters that let tests compare traffic with the
//! cost model.
//!
//! A [`ProcessGroup`] is one rank's handle on a group of ranks. Member indices (`dst`, `src`,
//! `root`, the order of gathers) are positions in the group, 0..size, not global ranks. Ops
//! are collective: every member calls the same ops on the group in the same order, with
//! tensors of the same shape and dtype. After an op fails (a peer failed, a timeout, a
//! mismatch) the group is broken and every later op on it fails too, as with NCCL.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use candle_core::shape::Dim;
use candle_core::Tensor;

use crate::{Error, Result};

/// The ops a group offers, as named in errors and in [`CommStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommOp {
    AllReduceSum,
    AllGather,
    AllToAll,
    Broadcast,
    Send,
    Recv,
    Barrier,
}

impl CommOp {
    pub const ALL: [CommOp; 7] = [
        CommOp::AllReduceSum,
        CommOp::AllGather,
        CommOp::AllToAll,
        CommOp::Broadcast,
        CommOp::Send,
        CommOp::Recv,
        CommOp::Barrier,
    ];

    /// The op [`CommOp::name`] names.
    pub fn from_name(name: &str) -> Option<CommOp> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            CommOp::AllReduceSum => "all_reduce_sum",
            CommOp::AllGather => "all_gather",
            CommOp::AllToAll => "all_to_all",
            CommOp::Broadcast => "broadcast",
            CommOp::Send => "send",
            CommOp::Recv => "recv",
            CommOp::Barrier => "barrier",
        }
    }
}

impl fmt::Display for CommOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The communication backend of one group, as seen by one of its members: what a local
/// (threads), NCCL or other implementation provides. Tensors are the unit of exchange and
/// may live on any device; shapes and dtypes agree across members (the backend may check).
///
/// An NCCL implementation maps the collectives one to one, `all_to_all` to a grouped
/// send/recv, and `irecv` to a header (shape, dtype) followed by the payload.
pub trait Communicator: Send + Sync + fmt::Debug {
    /// The element-wise sum of every member's tensor, the same on every member.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor>;

    /// Every member's tensor, in member order.
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>>;

    /// Sends `chunks[j]` to member j and returns the chunk each member sent to this one, in
    /// member order. Every member passes `size` chunks of one shape.
    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>>;

    /// The root's tensor on every member; a non-root passes a tensor of the root's shape and
    /// dtype whose values are ignored.
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor>;

    /// Posts a send to member `dst`. Must not wait for `dst` to post its receive.
    fn isend(&self, tensor: &Tensor, dst: usize) -> Result<Box<dyn SendWork>>;

    /// Posts a receive from member `src`; receives from one source match its sends in order.
    fn irecv(&self, src: usize) -> Result<Box<dyn RecvWork>>;

    /// Returns once every member has called it.
    fn barrier(&self) -> Result<()>;
}

/// A posted send.
pub trait SendWork: Send {
    /// Waits until the send buffer may be reused.
    fn wait(self: Box<Self>) -> Result<()>;
}

/// A posted receive.
pub trait RecvWork: Send {
    /// Waits for the message and returns it.
    fn wait(self: Box<Self>) -> Result<Tensor>;
}

/// Counters of one (group, op, rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommCounts {
    pub calls: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl std::ops::AddAssign for CommCounts {
    fn add_assign(&mut self, o: Self) {
        self.calls += o.calls;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
    }
}

/// The key of a counter: which group, which op, which rank counted it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommKey {
    pub group: String,
    pub op: CommOp,
    pub rank: usize,
}

/// A shared registry of communication counters, keyed by (group name, op, rank). Clones share
/// the counters. Bytes are elements · element size, counted per rank as follows, with S the
/// bytes of the tensor this rank passes in and N the group size (a group of one moves
/// nothing):
///
/// | op | bytes_sent | bytes_received |
/// |---|---|---|
/// | all_reduce_sum | ⌊2·(N−1)·S / N⌋ (ring all-reduce) | the same |
/// | all_gather | (N−1)·S (its tensor to every peer) | (N−1)·S |
/// | all_to_all | (N−1)·S / N (every chunk but its own) | the same |
/// | broadcast | root: (N−1)·S, others 0 | root 0, others S |
/// | send / recv | S (at posting) / 0 | 0 / S (when the receive completes) |
/// | barrier | 0 | 0 |
///
/// These are backend-independent conventions, counted by [`ProcessGroup`], not by the
/// backend: the local backend moves tensors by reference, NCCL by its own algorithms.
#[derive(Debug, Clone, Default)]
pub struct CommStats {
    counts: Arc<Mutex<BTreeMap<CommKey, CommCounts>>>,
}

impl CommStats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&self, group: &str, op: CommOp, rank: usize, counts: CommCounts) {
        let key = CommKey {
            group: group.to_string(),
            op,
            rank,
        };
        *self.lock().entry(key).or_default() += counts;
    }

    /// The counters of `op` on `group` summed over its members.
    pub fn group_op(&self, group: &str, op: CommOp) -> CommCounts {
        self.sum(|k| k.group == group && k.op == op)
    }

    /// The counters of one rank's `op` on `group`.
    pub fn rank_op(&self, group: &str, op: CommOp, rank: usize) -> CommCounts {
        self.sum(|k| k.group == group && k.op == op && k.rank == rank)
    }

    /// The counters of every key that `keep` accepts, summed.
    pub fn sum(&self, keep: impl Fn(&CommKey) -> bool) -> CommCounts {
        let mut total = CommCounts::default();
        for (k, c) in self.lock().iter() {
            if keep(k) {
                total += *c;
            }
        }
        total
    }

    /// Every counter.
    pub fn snapshot(&self) -> BTreeMap<CommKey, CommCounts> {
        self.lock().clone()
    }

    /// Every member's counters of `group`, joined: for one process per rank, where each
    /// process counts only its own ranks' traffic. Collective over `group`; every member gets
    /// the union. The gather's own traffic (counted in `self`) is not in the result.
    pub fn gathered(&self, group: &ProcessGroup) -> Result<CommStats> {
        let rows: Vec<(String, &str, usize, u64, u64, u64)> = self
            .snapshot()
            .into_iter()
            .map(|(k, c)| {
                let row = (k.group, k.op.name(), k.rank, c.calls, c.bytes_sent);
                (row.0, row.1, row.2, row.3, row.4, c.bytes_received)
            })
            .collect();
        let text = serde_json::to_vec(&rows)
            .map_err(|e| Error::invalid(format!("encoding the communication counters: {e}")))?;
        let len = text.len();
        let parts =
            group.all_gather_tensors(&Tensor::from_vec(text, len, &candle_core::Device::Cpu)?)?;
        let joined = CommStats::new();
        for part in parts {
            let rows: Vec<(String, String, usize, u64, u64, u64)> =
                serde_json::from_slice(&part.to_vec1::<u8>()?).map_err(|e| {
                    Error::invalid(format!("a member's communication counters: {e}"))
                })?;
            for (group, op, rank, calls, bytes_sent, bytes_received) in rows {
                let op = CommOp::from_name(&op).ok_or_else(|| {
                    Error::invalid(format!("a member counted an unknown op `{op}`"))
                })?;
                let counts = CommCounts {
                    calls,
                    bytes_sent,
                    bytes_received,
                };
                joined.record(&group, op, rank, counts);
            }
        }
        Ok(joined)
    }

    /// Sets every counter to zero (forgets them).
    pub fn reset(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<CommKey, CommCounts>> {
        // Counters stay usable after a panicking rank poisoned the lock.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// One rank's handle on a process group. Cheap to clone.
#[derive(Clone)]
pub struct ProcessGroup {
    name: Arc<str>,
    members: Arc<[usize]>,
    index: usize,
    backend: Arc<dyn Communicator>,
    stats: CommStats,
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish()
    }
}

impl ProcessGroup {
    /// The handle of global rank `members[index]` on the group `name`.
    pub fn new(
        name: impl Into<String>,
        members: Vec<usize>,
        index: usize,
        backend: Arc<dyn Communicator>,
        stats: CommStats,
    ) -> Result<Self> {
        let name = name.into();
        if index >= members.len() {
            return Err(Error::invalid(format!(
                "index {index} out of range for group {name} of {} members",
                members.len()
            )));
        }
        Ok(Self {
            name: name.into(),
            members: members.into(),
            index,
            backend,
            stats,
        })
    }

    /// "ulysses[0,1]": the axis and the global ranks of the members.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The global ranks of the members, in member order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// This rank's position in the group.
    pub fn index(&self) -> usize {
        self.index
    }

    /// This rank's global rank.
    pub fn rank(&self) -> usize {
        self.members[self.index]
    }

    /// The position of global rank `rank` in the group.
    pub fn index_of(&self, rank: usize) -> Option<usize> {
        self.members.iter().position(|&r| r == rank)
    }

    /// The member before this one, cyclically (a ring's source).
    pub fn prev_index(&self) -> usize {
        (self.index + self.size() - 1) % self.size()
    }

    /// The member after this one, cyclically (a ring's destination).
    pub fn next_index(&self) -> usize {
        (self.index + 1) % self.size()
    }

    /// The shared counters this group writes to.
    pub fn stats(&self) -> &CommStats {
        &self.stats
    }

    /// This rank's counters on this group, per op.
    pub fn comm_stats(&self) -> BTreeMap<CommOp, CommCounts> {
        self.stats
            .snapshot()
            .into_iter()
            .filter(|(k, _)| *k.group == *self.name && k.rank == self.rank())
            .map(|(k, c)| (k.op, c))
            .collect()
    }

    fn record(&self, op: CommOp, bytes_sent: u64, bytes_received: u64) {
        let counts = CommCounts {
            calls: 1,
            bytes_sent,
            bytes_received,
        };
        self.stats.record(&self.name, op, self.rank(), counts);
    }

    fn error(&self, op: CommOp, message: String) -> Error {
        Error::Comm {
            group: self.name.to_string(),
            op: op.name(),
            message,
        }
    }

    fn check_member(&self, op: CommOp, what: &str, i: usize) -> Result<()> {
        if i >= self.size() {
            return Err(self.error(
                op,
                format!(
                    "{what} {i} is not a member index: the group has {} members",
                    self.size()
                ),
            ));
        }
        Ok(())
    }

    /// The element-wise sum over the members, summed in member order so that every member
    /// gets the same bits.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let n = self.size() as u64;
        let out = self.backend.all_reduce_sum(tensor)?;
        let bytes = 2 * (n - 1) * tensor_bytes(tensor) / n;
        self.record(CommOp::AllReduceSum, bytes, bytes);
        Ok(out)
    }

    /// Every member's tensor, in member order.
    pub fn all_gather_tensors(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let n = self.size() as u64;
        let out = self.backend.all_gather(tensor)?;
        let bytes = (n - 1) * tensor_bytes(tensor);
        self.record(CommOp::AllGather, bytes, bytes);
        Ok(out)
    }

    /// The members' tensors concatenated along `dim` in member order.
    pub fn all_gather<D: Dim>(&self, tensor: &Tensor, dim: D) -> Result<Tensor> {
        let dim = dim.to_index(tensor.shape(), "all_gather")?;
        let parts = self.all_gather_tensors(tensor)?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    /// Splits `tensor` along `scatter_dim` into `size` equal chunks, sends chunk j to member j
    /// and concatenates the received chunks along `gather_dim` in member order.
    /// E.g. Ulysses: (B, S/N, H, D) with scatter 2, gather 1 → (B, S, H/N, D).
    pub fn all_to_all<D1: Dim, D2: Dim>(
        &self,
        tensor: &Tensor,
        scatter_dim: D1,
        gather_dim: D2,
    ) -> Result<Tensor> {
        let op = CommOp::AllToAll;
        let scatter = scatter_dim.to_index(tensor.shape(), "all_to_all")?;
        let gather = gather_dim.to_index(tensor.shape(), "all_to_all")?;
        let n = self.size();
        let len = tensor.dim(scatter)?;
        if !len.is_multiple_of(n) {
            return Err(self.error(
                op,
                format!(
                    "scatter dim {scatter} of shape {:?} has size {len}, not divisible by the \
                     {n} members",
                    tensor.dims()
                ),
            ));
        }
        let chunk = len / n;
        let chunks = (0..n)
            .map(|j| tensor.narrow(scatter, j * chunk, chunk))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let received = self.backend.all_to_all(chunks)?;
        let bytes = (n as u64 - 1) * tensor_bytes(tensor) / n as u64;
        self.record(op, bytes, bytes);
        Ok(Tensor::cat(&received, gather)?)
    }

    /// The tensor of member `root` on every member. Non-roots pass a tensor of the root's
    /// shape and dtype (values ignored).
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        self.check_member(CommOp::Broadcast, "root", root)?;
        let out = self.backend.broadcast(tensor, root)?;
        let s = tensor_bytes(tensor);
        let n = self.size() as u64;
        let (sent, received) = match (n, self.index == root) {
            (1, _) => (0, 0),
            (_, true) => ((n - 1) * s, 0),
            (_, false) => (0, s),
        };
        self.record(CommOp::Broadcast, sent, received);
        Ok(out)
    }

    /// Posts a send to member `dst` and returns at once: sends are buffered until received.
    pub fn isend(&self, tensor: &Tensor, dst: usize) -> Result<SendHandle> {
        self.check_member(CommOp::Send, "dst", dst)?;
        let work = self.backend.isend(tensor, dst)?;
        self.record(CommOp::Send, tensor_bytes(tensor), 0);
        Ok(SendHandle { work })
    }

    /// Posts a receive from member `src`; receives from one source match its sends in the
    /// order both were posted.
    pub fn irecv(&self, src: usize) -> Result<RecvHandle> {
        self.check_member(CommOp::Recv, "src", src)?;
        let work = self.backend.irecv(src)?;
        Ok(RecvHandle {
            work,
            group: self.clone(),
        })
    }

    pub fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        self.isend(tensor, dst)?.wait()
    }

    pub fn recv(&self, src: usize) -> Result<Tensor> {
        self.irecv(src)?.wait()
    }

    /// Returns once every member has called it.
    pub fn barrier(&self) -> Result<()> {
        self.backend.barrier()?;
        self.record(CommOp::Barrier, 0, 0);
        Ok(())
    }
}

/// A posted send; [`wait`](Self::wait) returns once its buffer may be reused.
#[must_use = "a send handle should be waited on"]
pub struct SendHandle {
    work: Box<dyn SendWork>,
}

impl SendHandle {
    pub fn wait(self) -> Result<()> {
        self.work.wait()
    }
}

/// A posted receive; [`wait`](Self::wait) gives the tensor.
#[must_use = "a receive handle must be waited on to get the tensor"]
pub struct RecvHandle {
    work: Box<dyn RecvWork>,
    group: ProcessGroup,
}

impl RecvHandle {
    pub fn wait(self) -> Result<Tensor> {
        let tensor = self.work.wait()?;
        self.group.record(CommOp::Recv, 0, tensor_bytes(&tensor));
        Ok(tensor)
    }
}
