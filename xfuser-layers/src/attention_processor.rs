//! Self-attention processors for sequence parallelism, after xDiT's `xFuserAttnProcessor`s and
//! the USP paper (<https://arxiv.org/abs/2405.07719>): every sp rank holds a slice of the
//! image tokens and the processor exchanges what attention over the whole sequence needs.
//!
//! - Ulysses ([`SequenceParallelAttention::ulysses`], DeepSpeed-Ulysses): all-to-all q, k, v
//!   from "my tokens, all heads" to "all tokens, my heads", attention over the full sequence on
//!   H/U heads, all-to-all back.
//! - Ring ([`SequenceParallelAttention::ring`]): each rank keeps its queries; k, v slices travel
//!   around the ring (sent ahead while the current slice is computed) and the partial results
//!   merge through their log-sum-exp.
//! - USP ([`SequenceParallelAttention::usp`]): Ulysses inside each ulysses group, then Ring
//!   across the ring group on the sequences the all-to-all gathered, then all-to-all back.
//!
//! Joint attention (SD3, Flux: image and text tokens in one softmax) follows xDiT: the text
//! is whole on every sp rank. Ulysses gives each rank its H/U heads of the text queries,
//! keys and values (a slice, no exchange), attends over all image tokens and the text on
//! those heads, and all-gathers the text output's heads. Ring keeps the text queries with the
//! local image queries and joins the text keys and values once, before the image blocks go
//! around; every ring rank thus computes the whole text output.
//!
//! Each registers under its method name ("ulysses", "ring", "usp"; "serial" is the core's
//! [`SerialAttention`]) and is built per input shape from a [`SpContext`], whose padded layout
//! it honours: keys at gathered positions `≥ num_tokens` are padding and are left out (they
//! always form a suffix, so every block of keys has its real keys first), which makes the
//! result equal the serial one up to float rounding.
//!
//! # Communication per forward (what the byte counters measure)
//!
//! With B the batch, H the heads, Dh the head size, P the padded tokens per sp rank, e the
//! element size in bytes, L the layers, U the ulysses and R the ring degree, each rank sends
//! (and receives) per forward:
//!
//! - Ulysses, on the ulysses group: 4 all-to-alls per layer (q, k, v forth, o back), each
//!   sending (U−1)/U of the local B·H·P·Dh tensor:
//!   `all_to_all bytes = 4 · (U−1)/U · B·H·P·Dh · e · L`, `calls = 4·L`;
//! - Ring, on the ring group: R−1 steps per layer, each sending the current k and v block of
//!   B·H·P·Dh elements (under USP: B·(H/U)·(U·P)·Dh, the same count):
//!   `send bytes = 2 · (R−1) · B·H·P·Dh · e · L`, `send calls = 2·(R−1)·L`;
//! - USP: both of the above, on their groups.
//!
//! With hs = H·Dh, N = U (or R) the degree and p = B·N·P the padded tokens of the batch, a
//! rank thus sends 4·(N−1)/N · (p/N)·hs·e·L under Ulysses and 2·(N−1)/N · p·hs·e·L under Ring:
//! DESIGN §6's per-rank (4/N)·p·hs·L and 2·p·hs·L, times the (N−1)/N of the data that does not
//! stay on the rank.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use xfuser_core::attention::{
    scaled_dot_product_attention, AttentionProcessor, JointText, SerialAttention,
};
use xfuser_core::backbone::SpContext;
use xfuser_core::distributed::ProcessGroup;
use xfuser_core::kernels;
use xfuser_core::registry::AttentionProcessorEntry;
use xfuser_core::{Error, Result};

/// Where the real keys are: each sp rank holds `per_rank` tokens, and gathered positions
/// from `num_tokens` on are padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyLayout {
    per_rank: usize,
    num_tokens: usize,
}

impl KeyLayout {
    fn of(sp: &SpContext) -> Self {
        Self {
            per_rank: sp.padded_len(),
            num_tokens: sp.num_tokens(),
        }
    }

    /// Real keys among the `len` gathered positions from `start`: they come first.
    fn real_in(&self, start: usize, len: usize) -> usize {
        self.num_tokens.saturating_sub(start).min(len)
    }

    fn check_local(&self, processor: &str, q: &Tensor) -> Result<()> {
        let s = q.dim(2)?;
        if s != self.per_rank {
            return Err(Error::invalid(format!(
                "{processor} attention: q {:?} holds {s} tokens, but the sp split gives every \
                 rank {} (padding included); build the processor for this input shape",
                q.dims(),
                self.per_rank
            )));
        }
        Ok(())
    }
}

/// (B, H, S/U, Dh) -> (B, H/U, S, Dh): every member's tokens, this member's heads.
pub(crate) fn scatter_heads_gather_sequence(group: &ProcessGroup, xs: &Tensor) -> Result<Tensor> {
    let heads = xs.dim(1)?;
    if !heads.is_multiple_of(group.size()) {
        return Err(Error::invalid(format!(
            "Ulysses on {}: {heads} heads do not split over {} ranks",
            group.name(),
            group.size()
        )));
    }
    group.all_to_all(xs, 1, 2)
}

/// (B, H/U, S, Dh) -> (B, H, S/U, Dh), the inverse.
pub(crate) fn scatter_sequence_gather_heads(group: &ProcessGroup, xs: &Tensor) -> Result<Tensor> {
    group.all_to_all(xs, 2, 1)
}

/// Attention of q over one block of keys, in f32, with each query row's log-sum-exp of its
/// scaled scores: (o (B, H, S, Dh), lse (B, H, S, 1)).
fn attention_with_lse(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let k = k.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let weights = scores.broadcast_sub(&max)?.exp()?;
    let sum = weights.sum_keepdim(D::Minus1)?;
    let out = weights.matmul(&v)?.broadcast_div(&sum)?;
    let lse = (max + sum.log()?)?;
    Ok((out, lse))
}

/// Merges two partial attentions over disjoint key blocks: with l = log(e^l1 + e^l2),
/// o = o1·e^(l1−l) + o2·e^(l2−l). The exponents are ≤ 0, so nothing overflows.
fn merge_partials(a: (Tensor, Tensor), b: (Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
    let ((o1, l1), (o2, l2)) = (a, b);
    let max = l1.maximum(&l2)?;
    let (e1, e2) = ((&l1 - &max)?.exp()?, (&l2 - &max)?.exp()?);
    let lse = (&max + (&e1 + &e2)?.log()?)?;
    let w1 = (l1 - &lse)?.exp()?;
    let w2 = (l2 - &lse)?.exp()?;
    let out = (o1.broadcast_mul(&w1)? + o2.broadcast_mul(&w2)?)?;
    Ok((out, lse))
}

/// Ring attention of the local queries over the keys of every member of `ring`: member j
/// holds the gathered positions `block_offset + j·n .. + n` (n = k's sequence length). k, v
/// blocks move one member forward per step, the next block in flight while this one is
/// computed. `text` keys and values (all real), when given, are joined once, before the
/// ring's blocks. Returns the output in q's dtype.
fn ring_attention(
    ring: &ProcessGroup,
    layout: &KeyLayout,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    text: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<Tensor> {
    let (me, size) = (ring.index(), ring.size());
    let (next, prev) = (ring.next_index(), ring.prev_index());
    let block_len = k.dim(2)?;
    let mut kv = (k.contiguous()?, v.contiguous()?);
    let mut acc = RingAccumulator::new(q, scale)?;
    if let Some((tk, tv)) = text {
        acc.add(q, &tk.contiguous()?, &tv.contiguous()?, tk.dim(2)?, scale)?;
    }
    for step in 0..size {
        let in_flight = if step + 1 < size {
            let sends = [ring.isend(&kv.0, next)?, ring.isend(&kv.1, next)?];
            let recvs = [ring.irecv(prev)?, ring.irecv(prev)?];
            Some((sends, recvs))
        } else {
            None
        };
        let owner = (me + size - step) % size;
        let real = layout.real_in(owner * block_len, block_len);
        acc.add(q, &kv.0, &kv.1, real, scale)?;
        if let Some((sends, [recv_k, recv_v])) = in_flight {
            kv = (recv_k.wait()?, recv_v.wait()?);
            for send in sends {
                send.wait()?;
            }
        }
    }
    acc.finish(ring, q.dtype())
}

/// The partial attentions of a ring: f32 CPU queries through the fused online softmax of
/// [`kernels::OnlineAttention`], anything else block by block with candle ops and merged
/// through the log-sum-exp.
enum RingAccumulator {
    Online(kernels::OnlineAttention),
    Merged(Option<(Tensor, Tensor)>),
}

impl RingAccumulator {
    fn new(q: &Tensor, scale: f64) -> Result<Self> {
        Ok(match kernels::OnlineAttention::new(q, scale)? {
            Some(online) => Self::Online(online),
            None => Self::Merged(None),
        })
    }

    /// Adds the first `real` keys of the block k, v.
    fn add(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, real: usize, scale: f64) -> Result<()> {
        match self {
            Self::Online(online) => {
                if !online.add_block(k, v, real)? {
                    return Err(Error::invalid(format!(
                        "ring attention: a key/value block {:?} ({:?}) does not fit the queries \
                         {:?}",
                        k.dims(),
                        k.dtype(),
                        q.dims()
                    )));
                }
            }
            Self::Merged(merged) if real > 0 => {
                let part =
                    attention_with_lse(q, &k.narrow(2, 0, real)?, &v.narrow(2, 0, real)?, scale)?;
                *merged = Some(match merged.take() {
                    None => part,
                    Some(acc) => merge_partials(acc, part)?,
                });
            }
            Self::Merged(_) => {}
        }
        Ok(())
    }

    fn finish(self, ring: &ProcessGroup, dtype: DType) -> Result<Tensor> {
        let no_keys = || {
            Error::invalid(format!(
                "ring attention on {}: the sequence has no real tokens",
                ring.name()
            ))
        };
        let out = match self {
            Self::Online(online) => online.finish().map_err(|_| no_keys())?,
            Self::Merged(merged) => merged.ok_or_else(no_keys)?.0,
        };
        Ok(out.to_dtype(dtype)?)
    }
}

/// Attention over the whole sequence that the ulysses all-to-all gathered (no ring): keys
/// past `num_tokens` are padding and are cut off; `text` keys and values (all real) are
/// joined after the image's.
fn gathered_attention(
    layout: &KeyLayout,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    text: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<Tensor> {
    let real = layout.real_in(0, k.dim(2)?);
    if real == 0 {
        return Err(Error::invalid(
            "attention over a sequence with no real tokens",
        ));
    }
    let (k, v) = (k.narrow(2, 0, real)?, v.narrow(2, 0, real)?);
    let (k, v) = match text {
        Some((tk, tv)) => (Tensor::cat(&[&k, tk], 2)?, Tensor::cat(&[&v, tv], 2)?),
        None => (k, v),
    };
    scaled_dot_product_attention(q, &k, &v, None, scale)
}

/// This ulysses member's heads of a whole-text tensor (B, H, L, Dh) -> (B, H/U, L, Dh).
pub(crate) fn own_heads(ulysses: &ProcessGroup, xs: &Tensor) -> Result<Tensor> {
    let per = xs.dim(1)? / ulysses.size();
    Ok(xs.narrow(1, ulysses.index() * per, per)?.contiguous()?)
}

/// USP: Ulysses on `ulysses`, then Ring on `ring` (each skipped when its group has one
/// member). q, k, v: (B, H, P, Dh) -> (B, H, P, Dh). With `text` (joint attention), also the
/// whole text's output (B, H, L, Dh).
#[allow(clippy::too_many_arguments)]
fn usp_attention(
    ulysses: &ProcessGroup,
    ring: &ProcessGroup,
    layout: &KeyLayout,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    text: Option<JointText<'_>>,
    scale: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let use_ulysses = ulysses.size() > 1;
    let (q, k, v) = if use_ulysses {
        (
            scatter_heads_gather_sequence(ulysses, q)?,
            scatter_heads_gather_sequence(ulysses, k)?,
            scatter_heads_gather_sequence(ulysses, v)?,
        )
    } else {
        (q.clone(), k.clone(), v.clone())
    };
    let text = match text {
        Some(t) if use_ulysses => Some((
            own_heads(ulysses, t.q)?,
            own_heads(ulysses, t.k)?,
            own_heads(ulysses, t.v)?,
        )),
        Some(t) => Some((t.q.clone(), t.k.clone(), t.v.clone())),
        None => None,
    };
    let image_queries = q.dim(2)?;
    let q = match &text {
        Some((tq, _, _)) => Tensor::cat(&[&q, tq], 2)?,
        None => q,
    };
    let text_kv = text.as_ref().map(|(_, tk, tv)| (tk, tv));
    let out = if ring.size() > 1 {
        ring_attention(ring, layout, &q, &k, &v, text_kv, scale)?
    } else {
        gathered_attention(layout, &q, &k, &v, text_kv, scale)?
    };
    let (out, text_out) = match &text {
        Some((tq, _, _)) => (
            out.narrow(2, 0, image_queries)?,
            Some(out.narrow(2, image_queries, tq.dim(2)?)?.contiguous()?),
        ),
        None => (out, None),
    };
    if !use_ulysses {
        return Ok((out, text_out));
    }
    let text_out = match text_out {
        // (B, H/U, L, Dh) on each member -> (B, H, L, Dh), the heads in member order.
        Some(t) => Some(ulysses.all_gather(&t, 1)?),
        None => None,
    };
    Ok((
        scatter_sequence_gather_heads(ulysses, &out.contiguous()?)?,
        text_out,
    ))
}

fn require_single(group: &ProcessGroup, processor: &str, use_instead: &str) -> Result<()> {
    if group.size() > 1 {
        return Err(Error::invalid(format!(
            "the {processor} attention processor cannot split over {} ({} ranks); use \
             {use_instead}",
            group.name(),
            group.size()
        )));
    }
    Ok(())
}

/// Sequence-parallel self-attention over a rank's ulysses and ring groups: Ulysses inside,
/// Ring across (`usp_attention`). A degree of 1 on one axis reduces it to the other method;
/// the constructors say which method the caller asked for and refuse the other axis.
#[derive(Debug, Clone)]
pub struct SequenceParallelAttention {
    method: &'static str,
    ulysses: ProcessGroup,
    ring: ProcessGroup,
    layout: KeyLayout,
}

impl SequenceParallelAttention {
    /// DeepSpeed-Ulysses over the ulysses group; the ring degree must be 1 (else use USP).
    pub fn ulysses(sp: &SpContext) -> Result<Self> {
        require_single(sp.ring_group(), "ulysses", "\"usp\"")?;
        Ok(Self::build("ulysses", sp))
    }

    /// Ring attention over the ring group; the ulysses degree must be 1 (else use USP).
    pub fn ring(sp: &SpContext) -> Result<Self> {
        require_single(sp.ulysses_group(), "ring", "\"usp\"")?;
        Ok(Self::build("ring", sp))
    }

    /// Unified sequence parallelism, any degrees.
    pub fn usp(sp: &SpContext) -> Result<Self> {
        Ok(Self::build("usp", sp))
    }

    fn build(method: &'static str, sp: &SpContext) -> Self {
        Self {
            method,
            ulysses: sp.ulysses_group().clone(),
            ring: sp.ring_group().clone(),
            layout: KeyLayout::of(sp),
        }
    }
}

impl AttentionProcessor for SequenceParallelAttention {
    fn name(&self) -> &'static str {
        self.method
    }

    fn self_attention(
        &self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        self.layout.check_local(self.name(), q)?;
        let (out, _) = usp_attention(
            &self.ulysses,
            &self.ring,
            &self.layout,
            q,
            k,
            v,
            None,
            scale,
        )?;
        Ok(out)
    }

    fn joint_attention(
        &self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        text: JointText<'_>,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        self.layout.check_local(self.name(), q)?;
        let (out, text_out) = usp_attention(
            &self.ulysses,
            &self.ring,
            &self.layout,
            q,
            k,
            v,
            Some(text),
            scale,
        )?;
        let text_out = text_out.ok_or_else(|| Error::invalid("joint attention lost its text"))?;
        Ok((out, text_out))
    }
}

fn build_serial(sp: &SpContext) -> Result<Arc<dyn AttentionProcessor>> {
    require_single(sp.sp_group(), "serial", sp.method_name())?;
    Ok(Arc::new(SerialAttention))
}

fn build_ulysses(sp: &SpContext) -> Result<Arc<dyn AttentionProcessor>> {
    Ok(Arc::new(SequenceParallelAttention::ulysses(sp)?))
}

fn build_ring(sp: &SpContext) -> Result<Arc<dyn AttentionProcessor>> {
    Ok(Arc::new(SequenceParallelAttention::ring(sp)?))
}

fn build_usp(sp: &SpContext) -> Result<Arc<dyn AttentionProcessor>> {
    Ok(Arc::new(SequenceParallelAttention::usp(sp)?))
}

xfuser_core::inventory::submit! {
    AttentionProcessorEntry {
        name: "serial",
        description: "attention over the whole sequence on one rank (sp degree 1)",
        build: build_serial,
    }
}

xfuser_core::inventory::submit! {
    AttentionProcessorEntry {
        name: "ulysses",
        description: "DeepSpeed-Ulysses: all-to-all heads <-> sequence (heads % ulysses == 0)",
        build: build_ulysses,
    }
}

xfuser_core::inventory::submit! {
    AttentionProcessorEntry {
        name: "ring",
        description: "ring attention: k, v blocks pass around the ring, log-sum-exp merge",
        build: build_ring,
    }
}

xfuser_core::inventory::submit! {
    AttentionProcessorEntry {
        name: "usp",
        description: "unified sequence parallelism: Ulysses inside, Ring across",
        build: build_usp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use xfuser_core::backbone::SpContext;
    use xfuser_core::distributed::{
        launch_local, runtime_state::input_metadata, LaunchOptions, RankMesh, ShapeParams,
    };
    use xfuser_core::engine::ParallelConfig;
    use xfuser_core::testing::rel_l2;

    #[test]
    fn merging_partials_equals_attention_over_all_keys() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev).unwrap();
        let whole = scaled_dot_product_attention(&q, &k, &v, None, 0.5).unwrap();
        let part = |r: std::ops::Range<usize>| {
            let (k, v) = (k.narrow(2, r.start, r.len()), v.narrow(2, r.start, r.len()));
            attention_with_lse(&q, &k.unwrap(), &v.unwrap(), 0.5).unwrap()
        };
        let merged =
            merge_partials(merge_partials(part(3..7), part(0..1)).unwrap(), part(1..3)).unwrap();
        let (_, lse_all) = part(0..7);
        assert!(rel_l2(&merged.0, &whole).unwrap() < 1e-6);
        assert!(rel_l2(&merged.1, &lse_all).unwrap() < 1e-6);
    }

    /// Every processor on random q, k, v split as the runtime state splits `rows` token rows
    /// of `cols` columns over U·R ranks, against serial attention over the real tokens.
    fn check_against_serial(u: usize, r: usize, rows: usize, cols: usize, name: &str) {
        let (b, h, dh) = (2, 4, 3);
        let dev = Device::Cpu;
        let n = rows * cols;
        let q = Tensor::randn(0f32, 1.0, (b, h, n, dh), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, h, n, dh), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, h, n, dh), &dev).unwrap();
        let serial = scaled_dot_product_attention(&q, &k, &v, None, 0.3).unwrap();
        let config = ParallelConfig {
            ulysses_degree: u,
            ring_degree: r,
            ..Default::default()
        };
        let mesh = RankMesh::new(&config).unwrap();
        let params = ShapeParams {
            sp_degree: u * r,
            num_pipeline_patch: 1,
            patch_size: 1,
            vae_scale_factor: 8,
        };
        let meta = input_metadata(rows * 8, cols * 8, b, 1, &params).unwrap();
        let outs = launch_local(&mesh, &LaunchOptions::default(), |ctx| {
            let sp = SpContext::from_rank(&ctx, meta.full.clone())?;
            let slice = sp.slice().clone();
            let local = |t: &Tensor| -> Result<Tensor> {
                let mut parts = Vec::new();
                if slice.tokens.len > 0 {
                    parts.push(t.narrow(2, slice.tokens.start, slice.tokens.len)?);
                }
                if slice.padding() > 0 {
                    // Padding holds garbage: it must not matter.
                    let shape = (b, h, slice.padding(), dh);
                    parts.push((Tensor::ones(shape, DType::F32, &dev)? * 1e3)?);
                }
                Ok(Tensor::cat(&parts, 2)?)
            };
            let processor = xfuser_core::registry::build_attention_processor(name, &sp)?;
            let out = processor.self_attention(0, &local(&q)?, &local(&k)?, &local(&v)?, 0.3)?;
            Ok((slice, out))
        })
        .unwrap();
        for (slice, out) in outs.into_iter().filter(|(s, _)| s.tokens.len > 0) {
            let want = serial
                .narrow(2, slice.tokens.start, slice.tokens.len)
                .unwrap();
            let got = out.narrow(2, 0, slice.tokens.len).unwrap();
            let err = rel_l2(&got, &want).unwrap();
            assert!(err < 1e-6, "{name} u{u} r{r} {slice:?}: rel L2 {err:e}");
        }
    }

    #[test]
    fn processors_equal_serial_with_and_without_padding() {
        check_against_serial(2, 1, 4, 3, "ulysses");
        check_against_serial(2, 1, 5, 3, "ulysses");
        check_against_serial(4, 1, 5, 2, "ulysses");
        check_against_serial(1, 2, 5, 3, "ring");
        check_against_serial(1, 4, 6, 2, "ring");
        check_against_serial(1, 3, 4, 2, "usp");
        check_against_serial(2, 2, 5, 2, "usp");
        check_against_serial(2, 2, 9, 1, "usp");
    }

    #[test]
    fn processors_refuse_degrees_they_cannot_split() {
        let config = ParallelConfig {
            ulysses_degree: 2,
            ring_degree: 2,
            ..Default::default()
        };
        let mesh = RankMesh::new(&config).unwrap();
        let params = ShapeParams {
            sp_degree: 4,
            num_pipeline_patch: 1,
            patch_size: 1,
            vae_scale_factor: 8,
        };
        let meta = input_metadata(32, 32, 1, 1, &params).unwrap();
        let errors = launch_local(&mesh, &LaunchOptions::default(), |ctx| {
            let sp = SpContext::from_rank(&ctx, meta.full.clone())?;
            let build = |name| xfuser_core::registry::build_attention_processor(name, &sp);
            Ok([build("serial"), build("ulysses"), build("ring")]
                .map(|r| r.err().map(|e| e.to_string()).unwrap_or_default()))
        })
        .unwrap();
        let [serial, ulysses, ring] = &errors[0];
        assert!(serial.contains("use usp"), "{serial}");
        assert!(
            ulysses.contains("ring[") && ulysses.contains("\"usp\""),
            "{ulysses}"
        );
        assert!(
            ring.contains("ulysses[") && ring.contains("\"usp\""),
            "{ring}"
        );
    }
}
