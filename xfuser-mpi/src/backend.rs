//! The MPI process world and communicator.
//!
//! [`init_from_env`] initialises MPI when the process was started by a launcher and installs
//! an [`MpiWorld`] as the process world of `xfuser_core`; the runtime then builds every process
//! group of the mesh as an MPI communicator ([`MpiComm`]) and runs only this process's rank.
//! The MPI calls are the `mpi` crate's (rsmpi); what is written here is the mapping of the
//! [`Communicator`] contract onto them:
//!
//! - tensors cross as bytes after a small header (dtype code and dims) that the receiver checks
//!   against its own tensor in the collectives and uses to rebuild the tensor after a receive;
//! - every op is posted non-blocking and polled until done, so a peer that never joins fails
//!   the op after the run's timeout instead of hanging the job (the caller then aborts it);
//! - point-to-point messages are one MPI message each (header and payload together), matched
//!   by a probe when the receiver waits: sends never wait for the receiver to post.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::request::{Request, StaticScope};
use ::mpi::topology::{Color, SimpleCommunicator};
use ::mpi::traits::Communicator as _;
use ::mpi::traits::*;
use ::mpi::Threading;
use candle_core::{DType, Device, Tensor};
use xfuser_core::distributed::{
    Axis, CommStats, Communicator, ProcessGroup, ProcessWorld, RankContext, RankMesh, RecvWork,
    SendWork,
};
use xfuser_core::{Error, Result};

/// Environment variables a launcher sets in the processes it starts: Open MPI's mpirun,
/// MPICH's hydra and Slurm's PMI-2, and PMIx (Slurm's `srun --mpi=pmix`, Open MPI 5).
const LAUNCHER_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// Whether this process was started by an MPI launcher.
pub fn launched_by_mpi() -> bool {
    LAUNCHER_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// When started by an MPI launcher, initialises MPI and installs this process's world; the
/// returned universe finalises MPI when dropped, so keep it until the command is done. Without
/// a launcher MPI is not touched and the ranks of a parallel run are threads.
pub fn init_from_env() -> Result<Option<Universe>> {
    init_from_env_on(&Device::Cpu)
}

/// [`init_from_env`] for a process whose models run on `device`. On a CUDA device the groups
/// must move CUDA tensors: with the `nccl` feature they are NCCL communicators
/// (`nccl::NcclWorld`); without it this is refused, naming the feature.
pub fn init_from_env_on(device: &Device) -> Result<Option<Universe>> {
    if !launched_by_mpi() {
        return Ok(None);
    }
    if device.is_cuda() && !cfg!(feature = "nccl") {
        return Err(Error::Unsupported(
            "--device cuda under an MPI launcher needs the NCCL process groups: rebuild with \
             `--features nccl` (docs/gpu.md), or run one process with --device cuda"
                .into(),
        ));
    }
    let Some((universe, threading)) = ::mpi::initialize_with_threading(Threading::Multiple) else {
        return Err(Error::invalid(
            "MPI was already initialised in this process",
        ));
    };
    if threading != Threading::Multiple {
        return Err(Error::Unsupported(format!(
            "this MPI library gives thread level {threading:?}, but a rank calls MPI from its \
             compute threads and needs MPI_THREAD_MULTIPLE; use an MPI built with thread support"
        )));
    }
    let world = universe.world();
    let installed: Box<dyn ProcessWorld> = match device {
        #[cfg(feature = "nccl")]
        Device::Cuda(cuda) => Box::new(crate::nccl::NcclWorld::new(world, cuda.clone())),
        _ => Box::new(MpiWorld { world }),
    };
    xfuser_core::distributed::install_process_world(installed)?;
    Ok(Some(universe))
}

/// `MPI_COMM_WORLD` as the process world.
pub struct MpiWorld {
    world: SimpleCommunicator,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiWorld")
            .field("rank", &self.world.rank())
            .field("size", &self.world.size())
            .finish()
    }
}

// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE (checked in `init_from_env`), under which
// any thread may call MPI on any communicator; the handle itself is never mutated.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

impl ProcessWorld for MpiWorld {
    fn backend(&self) -> &str {
        "MPI"
    }

    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn rank_context(
        &self,
        mesh: &RankMesh,
        stats: &CommStats,
        timeout: Duration,
    ) -> Result<RankContext> {
        xfuser_core::distributed::check_world_size(mesh.world_size())?;
        let groups = split_groups(&self.world, mesh, |prefix, members, index, comm| {
            group(prefix, members, index, comm, stats, timeout)
        })?;
        Ok(RankContext::new(self.rank(), *mesh, groups, stats.clone()))
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// One process group per axis of `mesh`, then the world group, each over its own MPI
/// communicator split from `world` and made into a group by `make(prefix, members, index,
/// communicator)`. Collective over `world`.
pub(crate) fn split_groups(
    world: &SimpleCommunicator,
    mesh: &RankMesh,
    mut make: impl FnMut(&str, Vec<usize>, usize, SimpleCommunicator) -> Result<ProcessGroup>,
) -> Result<Vec<ProcessGroup>> {
    let rank = world.rank() as usize;
    let mut groups = Vec::with_capacity(Axis::ALL.len() + 1);
    // Every process splits the world once per axis, in the same order: the color is the
    // index of this process's group among the axis's groups, the key its place in it.
    for axis in Axis::ALL {
        let all = mesh.groups(axis);
        let (color, members) = all
            .iter()
            .enumerate()
            .find(|(_, members)| members.contains(&rank))
            .map(|(i, m)| (i, m.clone()))
            .ok_or_else(|| Error::invalid(format!("rank {rank} is in no {} group", axis.name())))?;
        let index = members.iter().position(|&r| r == rank).unwrap_or(0);
        let comm = world
            .split_by_color_with_key(Color::with_value(color as i32), index as i32)
            .ok_or_else(|| {
                Error::invalid(format!("MPI gave rank {rank} no {} group", axis.name()))
            })?;
        groups.push(make(axis.name(), members, index, comm)?);
    }
    let members: Vec<usize> = (0..mesh.world_size()).collect();
    groups.push(make("world", members, rank, world.duplicate())?);
    Ok(groups)
}

fn group(
    prefix: &str,
    members: Vec<usize>,
    index: usize,
    comm: SimpleCommunicator,
    stats: &CommStats,
    timeout: Duration,
) -> Result<ProcessGroup> {
    let name = xfuser_core::distributed::group_name(prefix, &members);
    let backend = MpiComm {
        inner: Arc::new(Inner {
            comm,
            name: name.clone(),
            timeout,
            received: Mutex::new(HashMap::new()),
        }),
    };
    ProcessGroup::new(name, members, index, Arc::new(backend), stats.clone())
}

/// One process's handle on an MPI communicator, as a process group's backend.
#[derive(Debug)]
pub struct MpiComm {
    inner: Arc<Inner>,
}

struct Inner {
    comm: SimpleCommunicator,
    name: String,
    timeout: Duration,
    /// Per source: the receives posted and the messages taken so far.
    received: Mutex<HashMap<usize, Arrivals>>,
}

/// The receive side of one source's message stream: the n-th receive posted gets the n-th
/// message, whichever order the receives are waited in.
#[derive(Debug, Default)]
struct Arrivals {
    posted: u64,
    taken: u64,
    early: BTreeMap<u64, Tensor>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("group", &self.name)
            .finish()
    }
}

// SAFETY: as for `MpiWorld`: MPI_THREAD_MULTIPLE, and the handle is never mutated.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

/// Elements of a header: the dtype code, the rank, then up to `MAX_DIMS` dims.
pub(crate) const HEADER: usize = 8;
const MAX_DIMS: usize = HEADER - 2;
const DTYPES: [DType; 7] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::U8,
    DType::U32,
    DType::I64,
];

pub(crate) fn header(t: &Tensor) -> std::result::Result<[u64; HEADER], String> {
    let dims = t.dims();
    if dims.len() > MAX_DIMS {
        return Err(format!(
            "a tensor of {} dims; at most {MAX_DIMS} cross processes",
            dims.len()
        ));
    }
    let code = DTYPES
        .iter()
        .position(|&d| d == t.dtype())
        .ok_or_else(|| format!("dtype {:?} does not cross processes", t.dtype()))?;
    let mut h = [0u64; HEADER];
    h[0] = code as u64;
    h[1] = dims.len() as u64;
    for (slot, &d) in h[2..].iter_mut().zip(dims) {
        *slot = d as u64;
    }
    Ok(h)
}

fn describe(h: &[u64]) -> String {
    let dtype = DTYPES
        .get(h[0] as usize)
        .map_or("?".to_string(), |d| format!("{d:?}"));
    let rank = (h[1] as usize).min(MAX_DIMS);
    format!("{dtype} {:?}", &h[2..2 + rank])
}

pub(crate) fn dtype_and_dims(h: &[u64]) -> std::result::Result<(DType, Vec<usize>), String> {
    let dtype = *DTYPES
        .get(h[0] as usize)
        .ok_or_else(|| format!("a message of unknown dtype code {}", h[0]))?;
    let rank = h[1] as usize;
    if rank > MAX_DIMS {
        return Err(format!("a message header of {rank} dims"));
    }
    Ok((dtype, h[2..2 + rank].iter().map(|&d| d as usize).collect()))
}

/// The tensor's elements as bytes in native order (what `Tensor::from_raw_buffer` reads).
fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    fn bytes<T: candle_core::WithDType, const N: usize>(
        t: &Tensor,
        f: impl Fn(T) -> [u8; N],
    ) -> Result<Vec<u8>> {
        Ok(t.flatten_all()?
            .to_vec1::<T>()?
            .into_iter()
            .flat_map(f)
            .collect())
    }
    match t.dtype() {
        DType::F32 => bytes(t, f32::to_ne_bytes),
        DType::F64 => bytes(t, f64::to_ne_bytes),
        DType::F16 => bytes(t, |v: half::f16| v.to_ne_bytes()),
        DType::BF16 => bytes(t, |v: half::bf16| v.to_ne_bytes()),
        DType::U8 => bytes(t, u8::to_ne_bytes),
        DType::U32 => bytes(t, u32::to_ne_bytes),
        DType::I64 => bytes(t, i64::to_ne_bytes),
        other => Err(Error::Unsupported(format!(
            "dtype {other:?} does not cross processes"
        ))),
    }
}

fn from_bytes(bytes: &[u8], dtype: DType, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_raw_buffer(bytes, dtype, dims, &Device::Cpu)?)
}

impl Inner {
    fn comm_error(&self, op: &'static str, message: impl Into<String>) -> Error {
        Error::Comm {
            group: self.name.clone(),
            op,
            message: message.into(),
        }
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn index(&self) -> usize {
        self.comm.rank() as usize
    }

    /// Polls `request` until it completes or the timeout passes. On a timeout the request and
    /// its buffers are leaked (MPI may still write them) and the op fails; the caller then
    /// aborts the job, as a group is broken after a failed op.
    fn wait<D: ?Sized>(
        &self,
        op: &'static str,
        mut request: Request<'static, D, StaticScope>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut polls: u32 = 0;
        loop {
            match request.test() {
                Ok(_) => return Ok(()),
                Err(pending) => request = pending,
            }
            if start.elapsed() > self.timeout {
                std::mem::forget(request);
                return Err(Error::CommTimeout {
                    group: self.name.clone(),
                    op,
                    timeout: self.timeout,
                    message: "a peer process did not join".into(),
                });
            }
            idle(&mut polls);
        }
    }

    /// Every member's header, in member order.
    fn exchange_headers(&self, op: &'static str, h: [u64; HEADER]) -> Result<Vec<[u64; HEADER]>> {
        let send = leak(h.to_vec());
        let recv = leak(vec![0u64; self.size() * HEADER]);
        let request =
            self.comm
                .immediate_all_gather_into(StaticScope, send.for_mpi(), recv.for_mpi_mut());
        self.wait(op, request)?;
        drop(send.take());
        Ok(recv
            .take()
            .chunks(HEADER)
            .map(|c| {
                let mut a = [0u64; HEADER];
                a.copy_from_slice(c);
                a
            })
            .collect())
    }

    /// Fails unless every member's header equals member `reference`'s.
    fn check_same(
        &self,
        op: &'static str,
        headers: &[[u64; HEADER]],
        reference: usize,
    ) -> Result<()> {
        let expected = &headers[reference];
        if let Some((j, h)) = headers.iter().enumerate().find(|(_, h)| *h != expected) {
            return Err(self.comm_error(
                op,
                format!(
                    "member {reference} has {} but member {j} has {}",
                    describe(expected),
                    describe(h)
                ),
            ));
        }
        Ok(())
    }

    fn own_header(&self, op: &'static str, t: &Tensor) -> Result<[u64; HEADER]> {
        header(t).map_err(|m| self.comm_error(op, m))
    }

    /// Sums `values` over the members, element-wise.
    fn sum<T: Equivalence + Copy + Default + 'static>(
        &self,
        op: &'static str,
        values: Vec<T>,
    ) -> Result<Vec<T>> {
        let send = leak(values);
        let recv = leak(vec![T::default(); send.len()]);
        let request = self.comm.immediate_all_reduce_into(
            StaticScope,
            send.for_mpi(),
            recv.for_mpi_mut(),
            SystemOperation::sum(),
        );
        self.wait(op, request)?;
        drop(send.take());
        Ok(recv.take())
    }
}

/// How a rank waits between polls: spin briefly (a peer is usually close), then yield, then
/// sleep, so that ranks oversubscribing the cores leave them to the ranks that compute.
pub(crate) fn idle(polls: &mut u32) {
    *polls = polls.saturating_add(1);
    match *polls {
        0..=64 => std::hint::spin_loop(),
        65..=2048 => std::thread::yield_now(),
        _ => std::thread::sleep(Duration::from_micros(50)),
    }
}

/// A heap buffer lent to MPI for the life of a non-blocking request (`StaticScope` asks for
/// `'static` buffers). `take` gives it back once the request is complete; a buffer never taken
/// (the op timed out, MPI may still use it) is leaked on purpose.
struct Lent<T: 'static> {
    ptr: *mut [T],
}

fn leak<T: 'static>(v: Vec<T>) -> Lent<T> {
    Lent {
        ptr: Box::into_raw(v.into_boxed_slice()),
    }
}

impl<T: 'static> Lent<T> {
    fn len(&self) -> usize {
        self.ptr.len()
    }

    /// The buffer, for MPI to read while a request posted with it is pending.
    fn for_mpi(&self) -> &'static [T] {
        // SAFETY: the allocation lives until `take` (or forever); Rust code does not touch it
        // while MPI may.
        unsafe { &*self.ptr }
    }

    /// The buffer, for MPI to write while a request posted with it is pending; each buffer is
    /// lent to one request.
    #[allow(clippy::mut_from_ref)]
    fn for_mpi_mut(&self) -> &'static mut [T] {
        // SAFETY: as for `for_mpi`; the only other reference is taken after the request is done.
        unsafe { &mut *self.ptr }
    }

    fn take(self) -> Vec<T> {
        // SAFETY: the pointer came from `Box::into_raw` in `leak`, and the request that used
        // the buffer has completed, so nothing else refers to it.
        unsafe { Box::from_raw(self.ptr) }.into_vec()
    }
}

fn count(op: &'static str, inner: &Inner, n: usize) -> Result<::mpi::Count> {
    ::mpi::Count::try_from(n).map_err(|_| {
        inner.comm_error(
            op,
            format!("{n} bytes in one message; MPI counts are 32-bit"),
        )
    })
}

impl Communicator for MpiComm {
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_reduce_sum";
        let inner = &self.inner;
        let headers = inner.exchange_headers(OP, inner.own_header(OP, tensor)?)?;
        inner.check_same(OP, &headers, inner.index())?;
        let (dtype, dims) = (tensor.dtype(), tensor.dims().to_vec());
        // f64 sums in f64; every other dtype in f32, as the local backend does.
        if dtype == DType::F64 {
            let sum = inner.sum(OP, tensor.flatten_all()?.to_vec1::<f64>()?)?;
            return Ok(Tensor::from_vec(sum, dims, &Device::Cpu)?);
        }
        let values = tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let sum = inner.sum(OP, values)?;
        Ok(Tensor::from_vec(sum, dims, &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        const OP: &str = "all_gather";
        let inner = &self.inner;
        let headers = inner.exchange_headers(OP, inner.own_header(OP, tensor)?)?;
        let mut shapes = Vec::with_capacity(headers.len());
        for h in &headers {
            let (dtype, dims) = dtype_and_dims(h).map_err(|m| inner.comm_error(OP, m))?;
            let bytes = dims.iter().product::<usize>() * dtype.size_in_bytes();
            shapes.push((dtype, dims, bytes));
        }
        // Members may differ in shape (a data-parallel group one row short): every member sends
        // a slot of the largest size, which keeps to MPI's fixed-count all-gather.
        let slot = shapes.iter().map(|s| s.2).max().unwrap_or(0);
        count(OP, inner, slot * shapes.len())?;
        let mut mine = to_bytes(tensor)?;
        mine.resize(slot, 0);
        let send = leak(mine);
        let recv = leak(vec![0u8; slot * shapes.len()]);
        let request =
            inner
                .comm
                .immediate_all_gather_into(StaticScope, send.for_mpi(), recv.for_mpi_mut());
        inner.wait(OP, request)?;
        drop(send.take());
        let received = recv.take();
        shapes
            .iter()
            .enumerate()
            .map(|(j, (dtype, dims, bytes))| {
                from_bytes(&received[j * slot..j * slot + bytes], *dtype, dims)
            })
            .collect()
    }

    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>> {
        const OP: &str = "all_to_all";
        let inner = &self.inner;
        let n = inner.size();
        let Some(first) = chunks.first() else {
            return Err(inner.comm_error(OP, format!("no chunks for {n} members")));
        };
        if chunks.len() != n {
            return Err(inner.comm_error(OP, format!("{} chunks for {n} members", chunks.len())));
        }
        if let Some(c) = chunks
            .iter()
            .find(|c| c.dims() != first.dims() || c.dtype() != first.dtype())
        {
            return Err(inner.comm_error(
                OP,
                format!(
                    "chunks of {} and {}",
                    describe(&inner.own_header(OP, first)?),
                    describe(&inner.own_header(OP, c)?)
                ),
            ));
        }
        let headers = inner.exchange_headers(OP, inner.own_header(OP, first)?)?;
        inner.check_same(OP, &headers, inner.index())?;
        let mut bytes = Vec::new();
        for c in &chunks {
            bytes.extend(to_bytes(c)?);
        }
        count(OP, inner, bytes.len())?;
        let per = bytes.len() / n;
        let send = leak(bytes);
        let recv = leak(vec![0u8; per * n]);
        let request =
            inner
                .comm
                .immediate_all_to_all_into(StaticScope, send.for_mpi(), recv.for_mpi_mut());
        inner.wait(OP, request)?;
        drop(send.take());
        let received = recv.take();
        (0..n)
            .map(|j| {
                from_bytes(
                    &received[j * per..(j + 1) * per],
                    first.dtype(),
                    first.dims(),
                )
            })
            .collect()
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        const OP: &str = "broadcast";
        let inner = &self.inner;
        let headers = inner.exchange_headers(OP, inner.own_header(OP, tensor)?)?;
        inner.check_same(OP, &headers, root)?;
        let bytes = if inner.index() == root {
            to_bytes(tensor)?
        } else {
            vec![0u8; tensor.elem_count() * tensor.dtype().size_in_bytes()]
        };
        count(OP, inner, bytes.len())?;
        let buf = leak(bytes);
        let request = inner
            .comm
            .process_at_rank(root as ::mpi::Rank)
            .immediate_broadcast_into(StaticScope, buf.for_mpi_mut());
        inner.wait(OP, request)?;
        from_bytes(&buf.take(), tensor.dtype(), tensor.dims())
    }

    fn isend(&self, tensor: &Tensor, dst: usize) -> Result<Box<dyn SendWork>> {
        let inner = &self.inner;
        let mut message: Vec<u8> = inner
            .own_header("send", tensor)?
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        message.extend(to_bytes(tensor)?);
        count("send", inner, message.len())?;
        let buf = leak(message);
        let request = inner
            .comm
            .process_at_rank(dst as ::mpi::Rank)
            .immediate_send(StaticScope, buf.for_mpi());
        Ok(Box::new(MpiSend {
            inner: self.inner.clone(),
            posted: Some((request, buf)),
        }))
    }

    fn irecv(&self, src: usize) -> Result<Box<dyn RecvWork>> {
        let mut received = lock(&self.inner.received);
        let arrivals = received.entry(src).or_default();
        let seq = arrivals.posted;
        arrivals.posted += 1;
        Ok(Box::new(MpiRecv {
            inner: self.inner.clone(),
            src,
            seq,
        }))
    }

    fn barrier(&self) -> Result<()> {
        self.inner
            .wait("barrier", self.inner.comm.immediate_barrier())
    }
}

type SendRequest = Request<'static, [u8], StaticScope>;

/// A posted send: the request and the buffer lent to it. Waiting may wait for the receiver to
/// take the message (MPI's rendezvous for large messages), as with NCCL: the runtime waits for
/// its receives before its sends.
struct MpiSend {
    inner: Arc<Inner>,
    posted: Option<(SendRequest, Lent<u8>)>,
}

// SAFETY: the request is a handle MPI_THREAD_MULTIPLE lets any thread complete.
unsafe impl Send for MpiSend {}

impl SendWork for MpiSend {
    fn wait(mut self: Box<Self>) -> Result<()> {
        let Some((request, buf)) = self.posted.take() else {
            return Ok(());
        };
        self.inner.wait("send", request)?;
        drop(buf.take());
        Ok(())
    }
}

impl Drop for MpiSend {
    fn drop(&mut self) {
        // Only a failing rank drops a send unwaited; it is about to end the job, so the
        // request and its buffer are left to MPI rather than waited for.
        if let Some(posted) = self.posted.take() {
            std::mem::forget(posted);
        }
    }
}

/// A posted receive: messages are matched by a probe when a receive is waited for, so their
/// size need not be known in advance. MPI keeps one source's messages in order; a message that
/// arrives for a receive posted later than the one waiting is kept for it.
struct MpiRecv {
    inner: Arc<Inner>,
    src: usize,
    seq: u64,
}

impl RecvWork for MpiRecv {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        let mut received = lock(&self.inner.received);
        let arrivals = received.entry(self.src).or_default();
        while arrivals.taken <= self.seq {
            let tensor = self.inner.receive_one(self.src)?;
            arrivals.early.insert(arrivals.taken, tensor);
            arrivals.taken += 1;
        }
        arrivals.early.remove(&self.seq).ok_or_else(|| {
            self.inner.comm_error(
                "recv",
                format!(
                    "message {} from member {} was taken twice",
                    self.seq, self.src
                ),
            )
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The state is consistent after any panic (single inserts and removes).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// The next message from member `src`, rebuilt from its header.
    fn receive_one(&self, src: usize) -> Result<Tensor> {
        const OP: &str = "recv";
        let process = self.comm.process_at_rank(src as ::mpi::Rank);
        let start = Instant::now();
        let mut polls = 0;
        let (message, status) = loop {
            if let Some(found) = process.immediate_matched_probe() {
                break found;
            }
            if start.elapsed() > self.timeout {
                return Err(Error::CommTimeout {
                    group: self.name.clone(),
                    op: OP,
                    timeout: self.timeout,
                    message: format!("nothing arrived from member {src}"),
                });
            }
            idle(&mut polls);
        };
        let len = status.count(u8::equivalent_datatype()) as usize;
        let mut bytes = vec![0u8; len];
        message.matched_receive_into(&mut bytes[..]);
        if len < HEADER * 8 {
            return Err(self.comm_error(OP, format!("a message of {len} bytes has no header")));
        }
        let header: Vec<u64> = bytes[..HEADER * 8]
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_ne_bytes(b)
            })
            .collect();
        let (dtype, dims) = dtype_and_dims(&header).map_err(|m| self.comm_error(OP, m))?;
        let payload = &bytes[HEADER * 8..];
        if payload.len() != dims.iter().product::<usize>() * dtype.size_in_bytes() {
            return Err(self.comm_error(
                OP,
                format!(
                    "a message of {} bytes for {}",
                    payload.len(),
                    describe(&header)
                ),
            ));
        }
        from_bytes(payload, dtype, &dims)
    }
}

/// The ordered member pairs (src, dst) that get a point-to-point link in a group of `size`:
/// cyclic neighbours both ways (Ring attention, PipeFusion's stages, the parallel VAE's halos)
/// and member 0 with every member both ways (the outputs travelling to rank 0). Every member
/// computes the same list in the same order. Used by the `nccl` feature's groups
/// (`nccl.rs`); it lives here so that it is tested without a GPU.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn links(size: usize) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = (0..size)
        .flat_map(|i| {
            [
                (i, (i + 1) % size),
                (i, (i + size - 1) % size),
                (i, 0),
                (0, i),
            ]
        })
        .filter(|(a, b)| a != b)
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

#[cfg(test)]
mod tests {
    use super::links;

    #[test]
    fn links_join_neighbours_and_member_zero_both_ways() {
        assert_eq!(links(1), vec![]);
        assert_eq!(links(2), vec![(0, 1), (1, 0)]);
        let four = links(4);
        for pair in [
            (0, 1),
            (1, 2),
            (2, 3),
            (3, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (0, 3),
        ] {
            assert!(four.contains(&pair), "{pair:?} in {four:?}");
        }
        assert!(four.contains(&(0, 2)) && four.contains(&(2, 0)));
        assert!(!four.contains(&(1, 3)) && !four.contains(&(3, 1)));
    }
}
