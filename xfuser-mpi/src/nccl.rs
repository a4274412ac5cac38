//! Process groups as NCCL communicators, for ranks whose tensors live on CUDA devices: under
//! `mpirun` with `--device cuda`, [`NcclWorld`] is the process world and every group of the
//! mesh moves CUDA tensors with NCCL instead of copying them through host memory for MPI.
//!
//! What is written here is the mapping of the [`Communicator`] contract onto NCCL; the NCCL
//! calls are cudarc's (through candle-core's re-export, so the versions match candle's):
//!
//! - **Bootstrap.** MPI splits the world into one communicator per group exactly as for the MPI
//!   backend ([`crate::backend::split_groups`]); member 0 of each group creates the NCCL unique
//!   id and broadcasts its 128 bytes over that MPI communicator, and every member joins the
//!   NCCL communicator with it (`ncclCommInitRank`). MPI is already how the job is launched,
//!   so no second rendezvous (a torchrun-style TCP store) is needed.
//! - **Collectives** (all-reduce sum, all-gather, broadcast, barrier) run on the device's
//!   compute stream, candle's stream: they are ordered after the kernels that produced their
//!   input and before the ones that read their output, with no extra synchronisation.
//!   All-to-all is a grouped send/recv (`ncclGroupStart` … `ncclGroupEnd`) of the equal chunks.
//!   A barrier is an all-reduce of one element followed by a wait for the stream.
//! - **Point to point** (`isend`/`irecv`, for Ring attention, PipeFusion, the parallel VAE's
//!   halos and the runtime's output transfer) runs over one two-rank NCCL communicator per
//!   direction (src → dst) with a stream of its own, built for the pairs the parallel methods
//!   use: cyclic neighbours and member 0 with every member. A single communicator per pair
//!   would deadlock when both members send first (A: send, recv; B: send, recv) — NCCL matches
//!   operations in stream order. A message is a header (dtype, dims) then the payload, so the
//!   receiver can allocate it. "Non-blocking" means: `isend` returns once both are enqueued on
//!   the link's stream (after that stream waits for the compute stream), and its `wait`
//!   returns once the payload has left (an event on the link's stream, polled); the receiving
//!   side has a thread per incoming link that posts the next receive at once, so that a send
//!   never waits for the receiver's `irecv` (the contract's "sends are buffered until
//!   received"), and `irecv`'s `wait` takes the messages in order from that thread.
//! - **Failures and time-outs.** NCCL operations cannot be polled for a peer's absence the way
//!   MPI requests are: a peer that never joins makes a collective hang in its stream. The
//!   runtime's time-out applies to the receive side only; a failing rank ends the job through
//!   `MPI_Abort` (the CLI's panic and error hooks), which takes the others with it.
//!
//! Tensors on the CPU given to these groups (the runtime's images, for instance) are copied to
//! the device first; received tensors are always on the device.
//!
//! Checked here by compilation only (no GPU on the build machine); docs/gpu.md says what ran.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::Communicator as _;
use ::mpi::traits::*;
use candle_core::cuda::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, CudaView, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda::cudarc::nccl::safe::{group_end, group_start, Comm, Id, NcclType, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use xfuser_core::distributed::{
    group_name, CommStats, Communicator, ProcessGroup, ProcessWorld, RankContext, RankMesh,
    RecvWork, SendWork,
};
use xfuser_core::{Error, Result};

use crate::backend::{dtype_and_dims, header, idle, links, split_groups, HEADER};

/// `MPI_COMM_WORLD` as the process world, its groups NCCL communicators on `device`.
pub struct NcclWorld {
    world: SimpleCommunicator,
    device: CudaDevice,
}

impl NcclWorld {
    /// The world of an MPI job whose ranks compute on `device` (one GPU per process).
    pub fn new(world: SimpleCommunicator, device: CudaDevice) -> Self {
        Self { world, device }
    }
}

impl std::fmt::Debug for NcclWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclWorld")
            .field("rank", &self.world.rank())
            .field("size", &self.world.size())
            .field("device", &self.device)
            .finish()
    }
}

// SAFETY: as for `MpiWorld`: MPI runs with MPI_THREAD_MULTIPLE (checked before a world is
// installed) and the handle is never mutated; the CUDA device handle is thread-safe.
unsafe impl Send for NcclWorld {}
unsafe impl Sync for NcclWorld {}

impl ProcessWorld for NcclWorld {
    /// The launcher's name, as messages use it ("started by MPI"): the groups' NCCL is
    /// an implementation detail there.
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
            let name = group_name(prefix, &members);
            let backend = NcclComm::new(&name, &comm, index, members.len(), &self.device, timeout)?;
            ProcessGroup::new(name, members, index, Arc::new(backend), stats.clone())
        })?;
        Ok(RankContext::new(self.rank(), *mesh, groups, stats.clone()))
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// An NCCL communicator that may cross threads.
struct Shared(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as no two calls on it run
// at once; every use below holds the Mutex around it (or, for an incoming link, the one
// thread that owns it).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// One member's handle on a group: the group's communicator on the compute stream, the
/// outgoing links it sends on and the incoming ones it receives from.
pub struct NcclComm {
    name: String,
    index: usize,
    size: usize,
    device: CudaDevice,
    compute: Arc<CudaStream>,
    collective: Mutex<Shared>,
    outgoing: HashMap<usize, Mutex<Shared>>,
    incoming: HashMap<usize, Incoming>,
    timeout: Duration,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("group", &self.name)
            .field("index", &self.index)
            .finish()
    }
}

impl NcclComm {
    /// Joins the NCCL communicators of the group whose MPI communicator is `mpi` (this process
    /// is member `index` of `size`). Collective over the group. Links are built one pair at a
    /// time in the same order on every member, each blocking its two members only, so every
    /// member reaches the pair it waits on: the smallest pair not yet built has both of its
    /// members waiting on it.
    fn new(
        name: &str,
        mpi: &SimpleCommunicator,
        index: usize,
        size: usize,
        device: &CudaDevice,
        timeout: Duration,
    ) -> Result<Self> {
        let error = |message: String| Error::Comm {
            group: name.to_string(),
            op: "init",
            message,
        };
        let compute = device.cuda_stream();
        compute
            .context()
            .bind_to_thread()
            .map_err(|e| error(format!("{e:?}")))?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if index == 0 {
            let id = Id::new().map_err(|e| error(format!("ncclGetUniqueId: {e:?}")))?;
            internal = *id.internal();
        }
        mpi.process_at_rank(0).broadcast_into(&mut internal[..]);
        let collective = Comm::from_rank(compute.clone(), index, size, Id::uninit(internal))
            .map_err(|e| error(format!("ncclCommInitRank: {e:?}")))?;
        let mut outgoing = HashMap::new();
        let mut incoming = HashMap::new();
        for (src, dst) in links(size) {
            if index != src && index != dst {
                continue;
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            if index == src {
                let id = Id::new().map_err(|e| error(format!("ncclGetUniqueId: {e:?}")))?;
                internal = *id.internal();
                mpi.process_at_rank(dst as i32).send(&internal[..]);
            } else {
                mpi.process_at_rank(src as i32)
                    .receive_into(&mut internal[..]);
            }
            let stream = compute
                .context()
                .new_stream()
                .map_err(|e| error(format!("{e:?}")))?;
            // In a link, the sender is rank 0 and the receiver rank 1.
            let rank = usize::from(index == dst);
            let link = Comm::from_rank(stream, rank, 2, Id::uninit(internal))
                .map_err(|e| error(format!("ncclCommInitRank ({src} -> {dst}): {e:?}")))?;
            if index == src {
                outgoing.insert(dst, Mutex::new(Shared(link)));
            } else {
                incoming.insert(src, Incoming::start(link, device.clone(), name, src)?);
            }
        }
        Ok(Self {
            name: name.to_string(),
            index,
            size,
            device: device.clone(),
            compute,
            collective: Mutex::new(Shared(collective)),
            outgoing,
            incoming,
            timeout,
        })
    }

    fn error(&self, op: &'static str, message: impl Into<String>) -> Error {
        Error::Comm {
            group: self.name.clone(),
            op,
            message: message.into(),
        }
    }

    /// `tensor` on this group's device, contiguous (a CPU tensor is copied there).
    fn on_device(&self, tensor: &Tensor) -> Result<Tensor> {
        let device = Device::Cuda(self.device.clone());
        Ok(tensor.to_device(&device)?.contiguous()?)
    }

    /// A fresh zeroed device buffer of `n` elements, on the compute stream.
    fn buffer<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.device.alloc_zeros::<T>(n)?)
    }
}

/// Runs `$body` with `$T` the element type of `$dtype`, for the dtypes NCCL moves.
macro_rules! by_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            other => Err(Error::Unsupported(format!(
                "dtype {other:?} does not cross an NCCL group"
            ))),
        }
    };
}

/// The element types NCCL moves that candle stores on CUDA.
trait Element: NcclType + CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {}
impl<T: NcclType + CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static> Element for T {}

/// The device view of a contiguous CUDA tensor's elements, given to `f`.
fn with_view<T: Element, R>(tensor: &Tensor, f: impl FnOnce(CudaView<'_, T>) -> R) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(Error::invalid("an NCCL group moves CUDA tensors only"));
    };
    if !layout.is_contiguous() {
        return Err(Error::invalid(
            "an NCCL group moves contiguous tensors only",
        ));
    }
    let start = layout.start_offset();
    let slice = cuda.as_cuda_slice::<T>()?;
    Ok(f(slice.slice(start..start + layout.shape().elem_count())))
}

/// A tensor of `dims` owning `slice` on `device`.
fn wrap<T: Element>(slice: CudaSlice<T>, dims: &[usize], device: &CudaDevice) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone()));
    Tensor::from_storage(storage, dims, BackpropOp::none(), false)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NcclComm {
    fn all_reduce_typed<T: Element>(&self, t: &Tensor) -> Result<Tensor> {
        let mut out = self.buffer::<T>(t.elem_count())?;
        let comm = lock(&self.collective);
        with_view::<T, _>(t, |view| comm.0.all_reduce(&view, &mut out, &ReduceOp::Sum))?
            .map_err(|e| self.error("all_reduce_sum", format!("{e:?}")))?;
        Ok(wrap(out, t.dims(), &self.device))
    }

    fn all_gather_typed<T: Element>(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let n = t.elem_count();
        let mut out = self.buffer::<T>(n * self.size)?;
        let comm = lock(&self.collective);
        with_view::<T, _>(t, |view| comm.0.all_gather(&view, &mut out))?
            .map_err(|e| self.error("all_gather", format!("{e:?}")))?;
        let all = wrap(out, &[self.size, n], &self.device);
        (0..self.size)
            .map(|i| Ok(all.narrow(0, i, 1)?.reshape(t.dims())?))
            .collect()
    }

    fn broadcast_typed<T: Element>(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut out = self.buffer::<T>(t.elem_count())?;
        let comm = lock(&self.collective);
        let root_index = root as i32;
        let status = if self.index == root {
            with_view::<T, _>(t, |view| {
                comm.0.broadcast(Some(&view), &mut out, root_index)
            })?
        } else {
            comm.0
                .broadcast::<CudaSlice<T>, _, T>(None, &mut out, root_index)
        };
        status.map_err(|e| self.error("broadcast", format!("{e:?}")))?;
        Ok(wrap(out, t.dims(), &self.device))
    }

    /// Every chunk but this member's own goes out and one comes in from every peer, all in one
    /// NCCL group, so that the order of the sends and receives cannot deadlock.
    fn all_to_all_typed<T: Element>(&self, chunks: &[Tensor]) -> Result<Vec<Tensor>> {
        let dims = chunks[0].dims().to_vec();
        let n = chunks[0].elem_count();
        let mut received: Vec<Option<CudaSlice<T>>> = (0..self.size)
            .map(|j| (j != self.index).then(|| self.buffer::<T>(n)).transpose())
            .collect::<Result<_>>()?;
        let comm = lock(&self.collective);
        let guards: Vec<_> = chunks.iter().map(|c| c.storage_and_layout()).collect();
        let mut views = Vec::with_capacity(self.size);
        for (storage, layout) in &guards {
            let Storage::Cuda(cuda) = &**storage else {
                return Err(Error::invalid("an NCCL group moves CUDA tensors only"));
            };
            let start = layout.start_offset();
            views.push(cuda.as_cuda_slice::<T>()?.slice(start..start + n));
        }
        group_start().map_err(|e| self.error("all_to_all", format!("{e:?}")))?;
        let mut failure = None;
        for (j, slot) in received.iter_mut().enumerate() {
            let Some(buffer) = slot else { continue };
            let peer = j as i32;
            if let Err(e) = comm.0.send(&views[j], peer) {
                failure.get_or_insert(format!("send to {j}: {e:?}"));
            }
            if let Err(e) = comm.0.recv(buffer, peer) {
                failure.get_or_insert(format!("receive from {j}: {e:?}"));
            }
        }
        // The group is closed whatever happened inside it, or NCCL stays in group mode.
        let ended = group_end().map_err(|e| format!("ncclGroupEnd: {e:?}"));
        if let Some(message) = failure.or(ended.err()) {
            return Err(self.error("all_to_all", message));
        }
        drop(views);
        drop(guards);
        Ok(received
            .into_iter()
            .enumerate()
            .map(|(j, slot)| match slot {
                Some(buffer) => wrap(buffer, &dims, &self.device),
                None => chunks[j].clone(),
            })
            .collect())
    }

    fn isend_typed<T: Element>(&self, t: Tensor, dst: usize) -> Result<Box<dyn SendWork>> {
        let link = self.outgoing.get(&dst).ok_or_else(|| {
            self.error(
                "send",
                format!(
                    "no point-to-point link from member {} to {dst}: NCCL groups link cyclic \
                     neighbours and member 0 with every member",
                    self.index
                ),
            )
        })?;
        let h = header(&t).map_err(|m| self.error("send", m))?;
        let link = lock(link);
        let stream = link.0.stream();
        let fail = |e: String| self.error("send", e);
        // The payload is ready once the compute stream's work so far is done.
        stream
            .join(&self.compute)
            .map_err(|e| fail(format!("{e:?}")))?;
        let head = stream
            .clone_htod(&h[..])
            .map_err(|e| fail(format!("{e:?}")))?;
        link.0
            .send(&head, 1)
            .map_err(|e| fail(format!("header: {e:?}")))?;
        with_view::<T, _>(&t, |view| link.0.send(&view, 1))?
            .map_err(|e| fail(format!("payload: {e:?}")))?;
        let done = stream
            .record_event(None)
            .map_err(|e| fail(format!("{e:?}")))?;
        Ok(Box::new(NcclSend {
            done,
            _buffers: (t, head),
        }))
    }
}

impl Communicator for NcclComm {
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let t = self.on_device(tensor)?;
        by_dtype!(t.dtype(), T => self.all_reduce_typed::<T>(&t))
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let t = self.on_device(tensor)?;
        by_dtype!(t.dtype(), T => self.all_gather_typed::<T>(&t))
    }

    fn all_to_all(&self, chunks: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if chunks.len() != self.size {
            return Err(self.error(
                "all_to_all",
                format!("{} chunks for {} members", chunks.len(), self.size),
            ));
        }
        let chunks = chunks
            .iter()
            .map(|c| self.on_device(c))
            .collect::<Result<Vec<_>>>()?;
        if chunks.iter().any(|c| c.shape() != chunks[0].shape()) {
            return Err(self.error("all_to_all", "the chunks differ in shape"));
        }
        by_dtype!(chunks[0].dtype(), T => self.all_to_all_typed::<T>(&chunks))
    }

    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        let t = self.on_device(tensor)?;
        by_dtype!(t.dtype(), T => self.broadcast_typed::<T>(&t, root))
    }

    fn isend(&self, tensor: &Tensor, dst: usize) -> Result<Box<dyn SendWork>> {
        let t = self.on_device(tensor)?;
        by_dtype!(t.dtype(), T => self.isend_typed::<T>(t, dst))
    }

    fn irecv(&self, src: usize) -> Result<Box<dyn RecvWork>> {
        let link = self.incoming.get(&src).ok_or_else(|| {
            self.error(
                "recv",
                format!(
                    "no point-to-point link from member {src} to {}: NCCL groups link cyclic \
                     neighbours and member 0 with every member",
                    self.index
                ),
            )
        })?;
        let ticket = {
            let mut arrivals = lock(&link.arrivals);
            arrivals.posted += 1;
            arrivals.posted - 1
        };
        Ok(Box::new(NcclRecv {
            arrivals: link.arrivals.clone(),
            ticket,
            timeout: self.timeout,
            group: self.name.clone(),
        }))
    }

    fn barrier(&self) -> Result<()> {
        let one = Tensor::ones(1, DType::F32, &Device::Cuda(self.device.clone()))?;
        self.all_reduce_typed::<f32>(&one)?;
        self.compute
            .synchronize()
            .map_err(|e| self.error("barrier", format!("{e:?}")))
    }
}

/// A send enqueued on its link's stream; its buffers live until it is waited on.
struct NcclSend {
    done: CudaEvent,
    _buffers: (Tensor, CudaSlice<u64>),
}

impl SendWork for NcclSend {
    fn wait(self: Box<Self>) -> Result<()> {
        let mut polls = 0;
        loop {
            match self.done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => idle(&mut polls),
                Err(e) => {
                    return Err(Error::Comm {
                        group: "nccl link".into(),
                        op: "send",
                        message: format!("{e:?}"),
                    })
                }
            }
        }
    }
}

/// The receive side of one incoming link: a thread receives every message as soon as it is
/// sent, and the n-th receive posted takes the n-th message.
struct Incoming {
    arrivals: Arc<Mutex<Arrivals>>,
}

struct Arrivals {
    posted: u64,
    taken: u64,
    early: BTreeMap<u64, Tensor>,
    messages: mpsc::Receiver<Result<Tensor>>,
}

impl Incoming {
    fn start(link: Comm, device: CudaDevice, group: &str, src: usize) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let link = Shared(link);
        let name = format!("xfuser-nccl-{group}-from-{src}");
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let link = link;
                loop {
                    let message = receive_message(&link.0, &device);
                    let failed = message.is_err();
                    // Ends with the group (its receiver dropped) or the link's first failure.
                    if tx.send(message).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| Error::invalid(format!("cannot start a receive thread: {e}")))?;
        Ok(Self {
            arrivals: Arc::new(Mutex::new(Arrivals {
                posted: 0,
                taken: 0,
                early: BTreeMap::new(),
                messages: rx,
            })),
        })
    }
}

/// The next message of `link` (the sender is its rank 0): the header, then the payload it
/// describes. Waits by polling an event, so that an idle link does not keep a core spinning.
fn receive_message(link: &Comm, device: &CudaDevice) -> Result<Tensor> {
    let stream = link.stream();
    let fail = |e: String| Error::Comm {
        group: "nccl link".into(),
        op: "recv",
        message: e,
    };
    let mut head = stream
        .alloc_zeros::<u64>(HEADER)
        .map_err(|e| fail(format!("{e:?}")))?;
    link.recv(&mut head, 0)
        .map_err(|e| fail(format!("header: {e:?}")))?;
    wait_stream(&stream).map_err(fail)?;
    let h = stream
        .clone_dtoh(&head)
        .map_err(|e| fail(format!("{e:?}")))?;
    let (dtype, dims) = dtype_and_dims(&h).map_err(fail)?;
    let n: usize = dims.iter().product();
    by_dtype!(dtype, T => {
        let mut payload = stream
            .alloc_zeros::<T>(n)
            .map_err(|e| fail(format!("{e:?}")))?;
        link.recv(&mut payload, 0)
            .map_err(|e| fail(format!("payload: {e:?}")))?;
        wait_stream(&stream).map_err(fail)?;
        Ok(wrap(payload, &dims, device))
    })
}

/// Returns once `stream`'s work so far is done, polling.
fn wait_stream(stream: &Arc<CudaStream>) -> std::result::Result<(), String> {
    let event = stream.record_event(None).map_err(|e| format!("{e:?}"))?;
    let mut polls = 0;
    while !event.try_is_complete().map_err(|e| format!("{e:?}"))? {
        idle(&mut polls);
    }
    Ok(())
}

/// A posted receive: ticket n of its link.
struct NcclRecv {
    arrivals: Arc<Mutex<Arrivals>>,
    ticket: u64,
    timeout: Duration,
    group: String,
}

impl RecvWork for NcclRecv {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        let mut arrivals = lock(&self.arrivals);
        loop {
            if let Some(t) = arrivals.early.remove(&self.ticket) {
                return Ok(t);
            }
            let message = match arrivals.messages.recv_timeout(self.timeout) {
                Ok(message) => message?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::CommTimeout {
                        group: self.group.clone(),
                        op: "recv",
                        timeout: self.timeout,
                        message: "the peer sent nothing".into(),
                    })
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Comm {
                        group: self.group.clone(),
                        op: "recv",
                        message: "the link's receive thread ended".into(),
                    })
                }
            };
            let n = arrivals.taken;
            arrivals.taken += 1;
            if n == self.ticket {
                return Ok(message);
            }
            arrivals.early.insert(n, message);
        }
    }
}
