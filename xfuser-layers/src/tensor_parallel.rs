//! Tensor-parallel linear layers (Megatron-style column/row split, as LiBai's
//! `Linear(parallel="col" | "row")`), and loading each rank's shard of a full checkpoint.
//!
//! With a tensor-parallel group of T members, member r of a
//!
//! - [`ColumnParallelLinear`] keeps rows `[r·out/T, (r+1)·out/T)` of the (out, in) weight and
//!   the same slice of the bias, and computes its slice of the output, (…, out/T), without
//!   communicating (or, with [`gather_output`](ColumnParallelLinear::with_gather_output), the
//!   whole output after an all-gather);
//! - [`RowParallelLinear`] keeps columns `[r·in/T, (r+1)·in/T)` of the weight and the whole
//!   bias, takes its slice of the input, (…, in/T) — the column layer's local output — and
//!   all-reduces the partial products before adding the bias once.
//!
//! A column layer followed by a row layer (a feed-forward's fc1 → activation → fc2, attention's
//! q/k/v → heads → to_out) thus costs one all-reduce of the (…, out) output.
//!
//! A split dimension may be made of *segments* that are split one by one: a fused [q; k; v]
//! weight (segments [D, D, D]: rank r keeps [q_r; k_r; v_r]) or Flux's single-block `proj_out`,
//! whose input is [attention, mlp] concatenated (segments [D, 4D]: rank r's input is
//! [attn_r, mlp_r], the column layers' local outputs side by side).
//!
//! Loading needs only the rank's position in the tp group ([`TpRank`]); the group itself is
//! passed to the forwards that communicate, so one shard model per tp position can be loaded
//! before the ranks start and shared by the ranks of the other axes (as the PipeFusion stages
//! are). Communication goes through the [`ProcessGroup`], whose counters see every byte.
//!
//! Weights come through a [`ShardSource`]: a candle [`VarBuilder`] (reads each full tensor
//! transiently, keeps a copy of the shard) or a [`SafetensorsShards`], which copies only the
//! shard's bytes out of the memory-mapped file, so a rank never materializes the full matrix.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, D};
use candle_nn::VarBuilder;
use xfuser_core::distributed::ProcessGroup;
pub use xfuser_core::distributed::TpRank;
use xfuser_core::kernels;
use xfuser_core::{Error, Result};

/// Where a tensor-parallel layer reads its weights: the full checkpoint, from which each rank
/// takes its shard. Names are relative to the source's prefix (like a [`VarBuilder`]'s).
pub trait ShardSource {
    /// The source's prefix, "transformer_blocks.0.ff.net.0.proj": what errors call the layer.
    fn prefix(&self) -> String;

    /// The parts `ranges` along `dim` of the tensor `name`, whose full shape must be `shape`,
    /// concatenated along `dim`, in the source's dtype and on its device. The result owns a
    /// buffer of exactly its own size (it is not a view of the full tensor).
    fn load_shard(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        ranges: &[Range<usize>],
    ) -> Result<Tensor>;

    /// The whole tensor `name`, which must have shape `shape`.
    fn load_full(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let len = shape.first().copied().unwrap_or(1);
        self.load_shard(name, shape, 0, std::slice::from_ref(&(0..len)))
    }
}

fn joined(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}.{name}"),
    }
}

/// The parts `ranges` along `dim` of `full`, concatenated, copied into a buffer of their own.
fn narrow_parts(full: &Tensor, dim: usize, ranges: &[Range<usize>]) -> Result<Tensor> {
    let parts = ranges
        .iter()
        .map(|r| full.narrow(dim, r.start, r.len()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let joined = Tensor::cat(&parts, dim)?;
    // narrow (and a one-part cat) may keep a view of the full storage: copy the shard out.
    Ok(joined.force_contiguous()?)
}

/// A [`VarBuilder`] as a shard source: each tensor is read whole (from the mmap, into memory)
/// and the shard copied out of it; the full tensor is dropped before the call returns, so
/// what the layer keeps is its shard, but the rank transiently holds the full tensor.
impl ShardSource for VarBuilder<'_> {
    fn prefix(&self) -> String {
        VarBuilder::prefix(self)
    }

    fn load_shard(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        ranges: &[Range<usize>],
    ) -> Result<Tensor> {
        let full = self.get(shape, name)?;
        narrow_parts(&full, dim, ranges)
    }
}

/// Safetensors files, memory-mapped, from which a rank copies only its shard: the bytes of
/// the rows (or of each row's columns) it keeps, never the full matrix. Clones (and
/// [`pp`](Self::pp)) share the mapping and the count of bytes read.
#[derive(Clone)]
pub struct SafetensorsShards {
    inner: Arc<MmapedSafetensors>,
    /// What errors name: the file, or the folder of several.
    source: PathBuf,
    prefix: Vec<String>,
    dtype: DType,
    device: Device,
    bytes_read: Arc<AtomicU64>,
}

impl std::fmt::Debug for SafetensorsShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsShards")
            .field("source", &self.source)
            .field("prefix", &self.prefix.join("."))
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl SafetensorsShards {
    /// Maps `files` (one checkpoint, possibly in several shard files); tensors are returned in
    /// `dtype` on `device`.
    pub fn open<P: AsRef<Path>>(files: &[P], dtype: DType, device: &Device) -> Result<Self> {
        let first = files
            .first()
            .ok_or_else(|| Error::invalid("SafetensorsShards::open: no safetensors files given"))?
            .as_ref();
        let source = match files.len() {
            1 => first.to_path_buf(),
            _ => first.parent().unwrap_or(first).to_path_buf(),
        };
        // SAFETY: the files are mapped read-only; as every mmap user we rely on nobody
        // truncating them while the mapping is alive.
        let inner = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::Weights {
            file: source.clone(),
            message: format!(
                "not a readable safetensors file: {}",
                xfuser_core::error::candle_message(&e)
            ),
        })?;
        Ok(Self {
            inner: Arc::new(inner),
            source,
            prefix: Vec::new(),
            dtype,
            device: device.clone(),
            bytes_read: Arc::default(),
        })
    }

    /// The source under `name` ("transformer_blocks" → "transformer_blocks.0" → …).
    pub fn pp(&self, name: impl ToString) -> Self {
        let mut s = self.clone();
        s.prefix.push(name.to_string());
        s
    }

    /// Bytes copied out of the files so far, by this source and every clone of it.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    fn error(&self, message: String) -> Error {
        Error::Weights {
            file: self.source.clone(),
            message,
        }
    }
}

impl ShardSource for SafetensorsShards {
    fn prefix(&self) -> String {
        self.prefix.join(".")
    }

    fn load_shard(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        ranges: &[Range<usize>],
    ) -> Result<Tensor> {
        let path = joined(&self.prefix(), name);
        let view = self
            .inner
            .get(&path)
            .map_err(|_| self.error(format!("cannot find tensor `{path}` in the checkpoint")))?;
        if view.shape() != shape {
            return Err(self.error(format!(
                "tensor `{path}` has the wrong shape: expected: {shape:?}, got: {:?}",
                view.shape()
            )));
        }
        let stored = DType::try_from(view.dtype())
            .map_err(|_| self.error(format!("tensor `{path}`: unsupported dtype")))?;
        if matches!(
            stored,
            DType::F4 | DType::F6E2M3 | DType::F6E3M2 | DType::F8E8M0
        ) {
            return Err(self.error(format!(
                "tensor `{path}`: dtype {stored:?} is packed below a byte and cannot be sharded"
            )));
        }
        if dim >= shape.len().max(1) {
            return Err(self.error(format!(
                "tensor `{path}` of shape {shape:?} has no dimension {dim} to shard"
            )));
        }
        let mid = shape.get(dim).copied().unwrap_or(1);
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > mid) {
            return Err(self.error(format!(
                "tensor `{path}` of shape {shape:?}: range {r:?} of dimension {dim} is out of \
                 bounds"
            )));
        }
        // The tensor as (outer, mid, inner) row-major: every part is `outer` runs of bytes.
        let esz = stored.size_in_bytes();
        let outer: usize = shape[..dim].iter().product();
        let inner: usize = shape.get(dim + 1..).map_or(1, |s| s.iter().product());
        let data = view.data();
        let kept: usize = ranges.iter().map(|r| r.len()).sum();
        let mut bytes = Vec::with_capacity(outer * kept * inner * esz);
        for o in 0..outer {
            for r in ranges {
                let start = (o * mid + r.start) * inner * esz;
                let end = (o * mid + r.end) * inner * esz;
                bytes.extend_from_slice(&data[start..end]);
            }
        }
        self.bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut out_shape = shape.to_vec();
        if let Some(d) = out_shape.get_mut(dim) {
            *d = kept;
        }
        let tensor = Tensor::from_raw_buffer(&bytes, stored, &out_shape, &self.device)?;
        Ok(tensor.to_dtype(self.dtype)?)
    }
}

/// Where a model's split layers read their weights: the model's [`VarBuilder`] (a model built
/// in memory, as tests build them; each full tensor is read, its shard copied out), or the
/// checkpoint's files, of which each rank copies only its shard ([`SafetensorsShards`]).
/// [`pp`](Self::pp) walks down the module tree as a VarBuilder's does.
#[derive(Clone)]
pub enum SplitWeights<'a> {
    VarBuilder(VarBuilder<'a>),
    Files(SafetensorsShards),
}

impl std::fmt::Debug for SplitWeights<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::VarBuilder(vb) => write!(f, "SplitWeights::VarBuilder({})", vb.prefix()),
            Self::Files(files) => write!(f, "SplitWeights::Files({files:?})"),
        }
    }
}

impl SplitWeights<'_> {
    /// The source under `name`.
    pub fn pp(&self, name: impl ToString) -> Self {
        match self {
            Self::VarBuilder(vb) => Self::VarBuilder(vb.pp(name)),
            Self::Files(files) => Self::Files(files.pp(name)),
        }
    }
}

impl ShardSource for SplitWeights<'_> {
    fn prefix(&self) -> String {
        match self {
            Self::VarBuilder(vb) => ShardSource::prefix(vb),
            Self::Files(files) => files.prefix(),
        }
    }

    fn load_shard(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        ranges: &[Range<usize>],
    ) -> Result<Tensor> {
        match self {
            Self::VarBuilder(vb) => vb.load_shard(name, shape, dim, ranges),
            Self::Files(files) => files.load_shard(name, shape, dim, ranges),
        }
    }
}

/// How one dimension of a weight splits over the group: the segments it is made of (one for
/// a plain layer), each cut into T equal slices; a rank keeps its slice of every segment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Split {
    segments: Vec<usize>,
    index: usize,
    size: usize,
}

impl Split {
    fn new(kind: &str, layer: &str, what: &str, segments: &[usize], shard: TpRank) -> Result<Self> {
        let t = shard.size;
        if segments.is_empty() {
            return Err(Error::invalid(format!(
                "{kind} `{layer}`: {what} has no segments"
            )));
        }
        for (i, &n) in segments.iter().enumerate() {
            if !n.is_multiple_of(t) {
                let which = if segments.len() == 1 {
                    format!("{what} {n}")
                } else {
                    format!("segment {i} ({n}) of {what} {segments:?}")
                };
                return Err(Error::invalid(format!(
                    "{kind} `{layer}`: {which} is not divisible by the tensor-parallel degree \
                     {t}; every rank must hold an equal slice, so use a degree that divides it"
                )));
            }
        }
        Ok(Self {
            segments: segments.to_vec(),
            index: shard.index,
            size: t,
        })
    }

    /// Refuses a group other than the one the shard was cut for.
    fn check_group(&self, kind: &str, layer: &str, group: &ProcessGroup) -> Result<()> {
        if group.size() != self.size || group.index() != self.index {
            return Err(Error::invalid(format!(
                "{kind} `{layer}` holds shard {} of {} but runs on member {} of group {} ({} \
                 members); run it on the tensor-parallel group it was loaded for",
                self.index,
                self.size,
                group.index(),
                group.name(),
                group.size()
            )));
        }
        Ok(())
    }

    fn full(&self) -> usize {
        self.segments.iter().sum()
    }

    fn local(&self) -> usize {
        self.full() / self.size
    }

    /// This rank's slices of the full dimension, in segment order.
    fn ranges(&self) -> Vec<Range<usize>> {
        self.ranges_of(self.index)
    }

    fn ranges_of(&self, index: usize) -> Vec<Range<usize>> {
        let mut offset = 0;
        self.segments
            .iter()
            .map(|&n| {
                let part = n / self.size;
                let r = offset + index * part..offset + (index + 1) * part;
                offset += n;
                r
            })
            .collect()
    }

    /// Where each segment's slice lies in a rank's local layout.
    fn local_ranges(&self) -> Vec<Range<usize>> {
        let mut offset = 0;
        self.segments
            .iter()
            .map(|&n| {
                let part = n / self.size;
                offset += part;
                offset - part..offset
            })
            .collect()
    }
}

/// The bytes of the buffers that `t` keeps alive (on the CPU, the whole storage, which is
/// more than the tensor when it is a view of a larger one).
fn held_bytes(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    let fallback = t.elem_count() * t.dtype().size_in_bytes();
    match &*storage {
        Storage::Cpu(cpu) => match cpu {
            CpuStorage::U8(v) => v.len(),
            CpuStorage::U32(v) => v.len() * 4,
            CpuStorage::I16(v) => v.len() * 2,
            CpuStorage::I32(v) => v.len() * 4,
            CpuStorage::I64(v) => v.len() * 8,
            CpuStorage::BF16(v) => v.len() * 2,
            CpuStorage::F16(v) => v.len() * 2,
            CpuStorage::F32(v) => v.len() * 4,
            CpuStorage::F64(v) => v.len() * 8,
            _ => fallback,
        },
        _ => fallback,
    }
}

fn check_input(kind: &str, layer: &str, what: &str, xs: &Tensor, expected: usize) -> Result<()> {
    let got = xs.dims().last().copied();
    if got != Some(expected) {
        return Err(Error::invalid(format!(
            "{kind} `{layer}`: input of shape {:?} should end in {what} {expected}",
            xs.dims()
        )));
    }
    Ok(())
}

const COLUMN: &str = "column-parallel linear";
const ROW: &str = "row-parallel linear";

/// y_r = x · W_rᵀ + b_r, W_r this rank's rows of the (out, in) weight: the output features
/// split over the group, no communication (unless the output is gathered).
#[derive(Debug, Clone)]
pub struct ColumnParallelLinear {
    name: String,
    /// (out/T, in), laid out for [`kernels::matmul_t`].
    weight: Tensor,
    /// (out/T)
    bias: Option<Tensor>,
    in_features: usize,
    split: Split,
    gather_output: bool,
}

impl ColumnParallelLinear {
    /// This rank's shard of the `in_features` → `out_features` linear layer at `source`
    /// (`weight` (out, in), `bias` (out) when `bias`); `shard`: a [`TpRank`] or the tp
    /// [`ProcessGroup`].
    pub fn load<S: ShardSource>(
        in_features: usize,
        out_features: usize,
        bias: bool,
        shard: impl Into<TpRank>,
        source: &S,
    ) -> Result<Self> {
        Self::load_fused(in_features, &[out_features], bias, shard, source)
    }

    /// As [`load`](Self::load) for a weight whose output features are the concatenation of
    /// `out_segments` (a fused [q; k; v]: [D, D, D]), each split over the group: the rank keeps
    /// its slice of every segment, side by side in segment order.
    pub fn load_fused<S: ShardSource>(
        in_features: usize,
        out_segments: &[usize],
        bias: bool,
        shard: impl Into<TpRank>,
        source: &S,
    ) -> Result<Self> {
        let name = source.prefix();
        let split = Split::new(COLUMN, &name, "out_features", out_segments, shard.into())?;
        let ranges = split.ranges();
        let weight = source.load_shard("weight", &[split.full(), in_features], 0, &ranges)?;
        let bias = match bias {
            true => Some(source.load_shard("bias", &[split.full()], 0, &ranges)?),
            false => None,
        };
        Ok(Self {
            name,
            weight: kernels::gemm_friendly_weight(&weight)?,
            bias,
            in_features,
            split,
            gather_output: false,
        })
    }

    /// Whether [`forward`](Self::forward) all-gathers the output into the whole (…, out).
    pub fn with_gather_output(mut self, gather_output: bool) -> Self {
        self.gather_output = gather_output;
        self
    }

    /// (…, in) → (…, out/T), this rank's slice; with `gather_output`, (…, out) all-gathered
    /// over `group`, the tp group the layer was loaded for.
    pub fn forward(&self, xs: &Tensor, group: &ProcessGroup) -> Result<Tensor> {
        self.split.check_group(COLUMN, &self.name, group)?;
        let local = self.forward_local(xs)?;
        match self.gather_output {
            true => self.gather(&local, group),
            false => Ok(local),
        }
    }

    /// (…, in) → (…, out/T): this rank's output features, without communicating.
    pub fn forward_local(&self, xs: &Tensor) -> Result<Tensor> {
        let (ys, bias) = self.forward_local_without_bias(xs)?;
        Ok(match bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        })
    }

    /// The local product without the bias, and this rank's bias slice, for callers that fuse
    /// the bias into the next pass (e.g. a head split).
    pub fn forward_local_without_bias(&self, xs: &Tensor) -> Result<(Tensor, Option<&Tensor>)> {
        check_input(COLUMN, &self.name, "in_features", xs, self.in_features)?;
        Ok((kernels::matmul_t(xs, &self.weight)?, self.bias.as_ref()))
    }

    /// Every rank's (…, out/T) slice all-gathered over `group` into the whole (…, out), in
    /// the full layer's feature order (segment by segment).
    pub fn gather(&self, local: &Tensor, group: &ProcessGroup) -> Result<Tensor> {
        self.split.check_group(COLUMN, &self.name, group)?;
        if self.split.size == 1 {
            return Ok(local.clone());
        }
        let parts = group.all_gather_tensors(&local.contiguous()?)?;
        if self.split.segments.len() == 1 {
            return Ok(Tensor::cat(&parts, D::Minus1)?);
        }
        let last = local.rank() - 1;
        let mut pieces = Vec::with_capacity(parts.len() * self.split.segments.len());
        for r in self.split.local_ranges() {
            for part in &parts {
                pieces.push(part.narrow(last, r.start, r.len())?);
            }
        }
        Ok(Tensor::cat(&pieces, last)?)
    }

    /// This rank's weight, (out/T, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// This rank's bias slice, (out/T).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The full layer's output features.
    pub fn out_features(&self) -> usize {
        self.split.full()
    }

    /// This rank's output features, out/T.
    pub fn local_out_features(&self) -> usize {
        self.split.local()
    }

    /// The full output features' ranges this rank computes, in its local order.
    pub fn out_ranges(&self) -> Vec<Range<usize>> {
        self.split.ranges()
    }

    /// The shard this rank holds.
    pub fn shard(&self) -> TpRank {
        TpRank {
            index: self.split.index,
            size: self.split.size,
        }
    }

    /// The bytes of the weight and bias buffers this rank keeps.
    pub fn parameter_bytes(&self) -> usize {
        held_bytes(&self.weight) + self.bias.as_ref().map_or(0, held_bytes)
    }
}

/// y = Σ_r x_r · W_rᵀ + b, W_r this rank's columns of the (out, in) weight and x_r its slice
/// of the input: the input features split over the group, the partial products all-reduced,
/// the bias added once after the reduce.
#[derive(Debug, Clone)]
pub struct RowParallelLinear {
    name: String,
    /// (out, in/T), laid out for [`kernels::matmul_t`].
    weight: Tensor,
    /// (out), whole.
    bias: Option<Tensor>,
    out_features: usize,
    split: Split,
}

impl RowParallelLinear {
    /// This rank's shard of the `in_features` → `out_features` linear layer at `source`
    /// (`weight` (out, in), `bias` (out) when `bias`); `shard`: a [`TpRank`] or the tp
    /// [`ProcessGroup`].
    pub fn load<S: ShardSource>(
        in_features: usize,
        out_features: usize,
        bias: bool,
        shard: impl Into<TpRank>,
        source: &S,
    ) -> Result<Self> {
        Self::load_fused(&[in_features], out_features, bias, shard, source)
    }

    /// As [`load`](Self::load) for a layer whose input is the concatenation of `in_segments`,
    /// each split over the group (Flux's single-block `proj_out` over [attention, mlp]: the
    /// rank's input is [attn_r, mlp_r]).
    pub fn load_fused<S: ShardSource>(
        in_segments: &[usize],
        out_features: usize,
        bias: bool,
        shard: impl Into<TpRank>,
        source: &S,
    ) -> Result<Self> {
        let name = source.prefix();
        let split = Split::new(ROW, &name, "in_features", in_segments, shard.into())?;
        let weight =
            source.load_shard("weight", &[out_features, split.full()], 1, &split.ranges())?;
        let bias = match bias {
            true => Some(source.load_full("bias", &[out_features])?),
            false => None,
        };
        Ok(Self {
            name,
            weight: kernels::gemm_friendly_weight(&weight)?,
            bias,
            out_features,
            split,
        })
    }

    /// (…, in/T) → (…, out): the partial product all-reduced over `group` (the tp group the
    /// layer was loaded for), plus the bias.
    pub fn forward(&self, xs: &Tensor, group: &ProcessGroup) -> Result<Tensor> {
        let (ys, bias) = self.forward_without_bias(xs, group)?;
        Ok(match bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        })
    }

    /// The all-reduced product without the bias, and the bias, for callers that add it in a
    /// fused residual ([`kernels::gated_residual`]).
    pub fn forward_without_bias(
        &self,
        xs: &Tensor,
        group: &ProcessGroup,
    ) -> Result<(Tensor, Option<&Tensor>)> {
        self.split.check_group(ROW, &self.name, group)?;
        let partial = self.forward_partial(xs)?;
        Ok((group.all_reduce_sum(&partial)?, self.bias.as_ref()))
    }

    /// This rank's partial product x_r · W_rᵀ, not reduced, without the bias: for callers
    /// that reduce several row layers' outputs in one all-reduce (e.g. the image and text
    /// outputs of a joint attention, concatenated along the sequence).
    pub fn forward_partial(&self, xs: &Tensor) -> Result<Tensor> {
        check_input(ROW, &self.name, "local in_features", xs, self.split.local())?;
        Ok(kernels::matmul_t(xs, &self.weight)?)
    }

    /// This rank's slice (…, in/T) of a whole input (…, in): what it would get from a
    /// column-parallel layer before.
    pub fn scatter_input(&self, xs: &Tensor) -> Result<Tensor> {
        check_input(ROW, &self.name, "in_features", xs, self.split.full())?;
        let last = xs.rank() - 1;
        let parts = self
            .split
            .ranges()
            .into_iter()
            .map(|r| xs.narrow(last, r.start, r.len()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, last)?)
    }

    /// This rank's weight, (out, in/T).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The whole bias, (out).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The full layer's input features.
    pub fn in_features(&self) -> usize {
        self.split.full()
    }

    /// This rank's input features, in/T.
    pub fn local_in_features(&self) -> usize {
        self.split.local()
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The full input features' ranges this rank takes, in its local order.
    pub fn in_ranges(&self) -> Vec<Range<usize>> {
        self.split.ranges()
    }

    /// The shard this rank holds.
    pub fn shard(&self) -> TpRank {
        TpRank {
            index: self.split.index,
            size: self.split.size,
        }
    }

    /// The bytes of the weight and bias buffers this rank keeps.
    pub fn parameter_bytes(&self) -> usize {
        held_bytes(&self.weight) + self.bias.as_ref().map_or(0, held_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_rank_by_rank() {
        let split = Split {
            segments: vec![4, 8],
            index: 1,
            size: 2,
        };
        assert_eq!(split.ranges(), vec![2..4, 8..12]);
        assert_eq!(split.local_ranges(), vec![0..2, 2..6]);
        assert_eq!(split.local(), 6);
        assert_eq!(split.ranges_of(0), vec![0..2, 4..8]);
    }

    #[test]
    fn held_bytes_sees_the_storage_behind_a_view() -> Result<()> {
        let full = Tensor::zeros((8, 4), DType::F32, &Device::Cpu)?;
        let view = full.narrow(0, 0, 2)?;
        assert_eq!(held_bytes(&view), 8 * 4 * 4);
        assert_eq!(
            held_bytes(&narrow_parts(&full, 0, std::slice::from_ref(&(0..2)))?),
            2 * 4 * 4
        );
        Ok(())
    }
}
