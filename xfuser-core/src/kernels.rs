//! Fused CPU kernels for the f32 hot paths of the diffusion transformers: each replaces a chain
//! of candle ops (one pass and one allocation each) by a single parallel pass over the data,
//! with the same arithmetic in the same order, so results differ from the unfused chain only by
//! the rounding of `exp` (a Cephes-style polynomial, ≤ 2 ulp) and of sums (16 partial sums).
//!
//! Every function takes any tensors: f32 tensors on the CPU in the expected layout go through
//! the kernel, anything else (other dtypes, devices or layouts) through the equivalent candle
//! ops. The loops are written so that the compiler vectorizes them; they are compiled for
//! AVX-512 and AVX2 and the best one the CPU has is picked at run time. No FMA contraction is
//! done, so every path gives the same bits.

use candle_core::{CpuStorage, DType, Device, Shape, Storage, Tensor, D};
use rayon::prelude::*;

type Result<T> = candle_core::Result<T>;

/// `fn name(args) body`, compiled for AVX-512, AVX2+FMA and the baseline, dispatched at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn inner($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) {
                    inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// e^x in f32 (Cephes `expf`): x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-7 polynomial, 2^n
/// by the exponent bits. Relative error ≤ 2 ulp; inputs are clamped to the finite range, so
/// e^x for x < −87.3 is 1e-38 rather than 0 or a subnormal. NaN stays NaN.
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp keeps NaN, which must not reach the exponent bits
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let input = x;
    // max/min rather than clamp: NaN maps into the range here (and back to NaN at the end),
    // so that the exponent below is always an in-range integer.
    let x = x.max(-87.336_54).min(88.376_26);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1 - n * C2;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r2 + r + 1.0;
    // SAFETY: n is an integer in [-126, 128) (x was clamped), so n + 127 fits an i32; an
    // unchecked conversion keeps the loop vectorized (`as` saturates element by element).
    let e = unsafe { (n + 127.0).to_int_unchecked::<i32>() };
    let out = y * f32::from_bits((e as u32) << 23);
    if input.is_nan() {
        input
    } else {
        out
    }
}

/// Sum with 16 independent partial sums (vectorizable, and closer to the exact sum than a
/// running total).
#[inline(always)]
fn sum16(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let mut tail = 0f32;
    for &v in chunks.remainder() {
        tail += v;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max16(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    acc.iter().fold(m, |a, &b| a.max(b))
}

fn is_cpu_f32(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu)
}

fn fast_path(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| is_cpu_f32(t) && t.is_contiguous())
}

/// Runs `f` on the f32 data of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kernel input is not contiguous");
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => f(&v[start..end]),
        _ => candle_core::bail!("kernel input is not an f32 CPU tensor"),
    }
}

/// The values of an f32 CPU tensor (any layout) in row-major order; empty for None.
fn values(t: Option<&Tensor>) -> Result<Vec<f32>> {
    t.map_or(Ok(Vec::new()), |t| {
        with_f32(&t.contiguous()?, |s| Ok(s.to_vec()))
    })
}

/// candle's path of the convolutions: `out` (B, Co, H, W) plus a per-channel bias (Co).
fn plus_channel_bias(out: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?),
        None => Ok(out),
    }
}

fn output(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Rows per parallel task: a few tasks per thread, at least `min_elems` values per task.
fn rows_per_task(rows: usize, row_len: usize, min_elems: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = rows.div_ceil(4 * threads);
    let by_size = min_elems.div_ceil(row_len.max(1));
    by_threads.max(by_size).max(1)
}

/// The same (n, k) weight stored column-major, so that the `x·wᵀ` of a linear layer reads a
/// row-major (k, n) matrix: the `gemm` crate behind candle's CPU matmul runs about 5–15 %
/// faster on that layout than on the transpose of a row-major weight. Values are unchanged.
pub fn gemm_friendly_weight(w: &Tensor) -> Result<Tensor> {
    if w.rank() != 2 || !matches!(w.device(), Device::Cpu) {
        return Ok(w.clone());
    }
    w.t()?.contiguous()?.t()
}

/// A linear layer whose weight is stored as [`gemm_friendly_weight`] lays it out.
pub fn gemm_friendly_linear(l: &candle_nn::Linear) -> Result<candle_nn::Linear> {
    Ok(candle_nn::Linear::new(
        gemm_friendly_weight(l.weight())?,
        l.bias().cloned(),
    ))
}

/// x (…, Din) · wᵀ -> (…, Dout) without a bias: candle's `Linear` product (the batch stacked
/// into the rows of one matrix), for callers that fuse the bias into the next pass.
pub fn matmul_t(xs: &Tensor, w: &Tensor) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let dims = xs.dims().to_vec();
    let din = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg("matmul_t: scalar input".into()))?;
    let rows = xs.elem_count() / din.max(1);
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
    if let Some(out) = sgemm_t(&xs, w, rows, din)? {
        return output(out, out_dims);
    }
    xs.reshape((rows, din))?.matmul(&w.t()?)?.reshape(out_dims)
}

/// The f32 CPU product of [`matmul_t`] by the `gemm` crate directly (None for other inputs):
/// unlike candle's matmul it does not zero the output before gemm overwrites it, and it
/// splits the product over the threads of the calling rayon pool (a rank's or a stream's
/// share), where candle splits it over the process-wide thread count.
fn sgemm_t(xs: &Tensor, w: &Tensor, rows: usize, din: usize) -> Result<Option<Vec<f32>>> {
    if !fast_path(&[xs]) || !is_cpu_f32(w) || w.rank() != 2 || w.dim(1)? != din {
        return Ok(None);
    }
    let dout = w.dim(0)?;
    let (w_storage, w_layout) = w.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(w_data)) = &*w_storage else {
        return Ok(None);
    };
    let (w_rows, w_cols) = (w_layout.stride()[0], w_layout.stride()[1]);
    let w_start = w_layout.start_offset();
    // The last element the strides reach must lie inside the storage.
    let w_last = w_start + (dout.max(1) - 1) * w_rows + (din.max(1) - 1) * w_cols;
    if rows == 0 || dout == 0 || din == 0 || w_last >= w_data.len() {
        return Ok(None);
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    with_f32(xs, |x| {
        let mut out: Vec<f32> = Vec::with_capacity(rows * dout);
        // SAFETY: x is (rows, din) row-major; w's element (j, k) is at w_start + j·w_rows +
        // k·w_cols, inside w_data (checked above); out has room for (rows, dout), which gemm
        // writes in full (read_dst false), before set_len exposes it.
        unsafe {
            gemm_strided(
                (rows, dout, din),
                (out.as_mut_ptr(), dout, 1),
                (x.as_ptr(), din, 1),
                (w_data.as_ptr().add(w_start), w_cols, w_rows),
                false,
                parallelism,
            );
            out.set_len(rows * dout);
        }
        Ok(Some(out))
    })
}

multiversion! {
    /// out = gelu_tanh(x + bias) per row; `bias` is one row or empty.
    fn gelu_rows(x: &[f32], bias: &[f32], out: &mut [f32], n: usize) {
        // 0.5·v·(1 + tanh(c·(v + 0.044715·v³))) = v / (1 + e^(−2c·(v + 0.044715·v³)))
        const C2: f32 = -2.0 * 0.797_884_6;
        for (xr, orow) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            if bias.is_empty() {
                for (o, &v) in orow.iter_mut().zip(xr) {
                    *o = v / (1.0 + exp_f32(C2 * (v + 0.044715 * v * v * v)));
                }
            } else {
                for ((o, &xv), &b) in orow.iter_mut().zip(xr).zip(bias) {
                    let v = xv + b;
                    *o = v / (1.0 + exp_f32(C2 * (v + 0.044715 * v * v * v)));
                }
            }
        }
    }
}

/// GELU with the tanh approximation (torch's `approximate="tanh"`) of `x + bias`, `bias`
/// broadcast over the last dimension.
pub fn bias_gelu_tanh(x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    let bias_ok = bias.is_none_or(|b| fast_path(&[b]) && b.elem_count() == n);
    if !fast_path(&[x]) || !bias_ok {
        let v = match bias {
            Some(b) => x.broadcast_add(b)?,
            None => x.clone(),
        };
        return v.gelu();
    }
    let shape = x.shape().clone();
    with_f32(x, |xs| {
        let bias_vec = match bias {
            Some(b) => with_f32(b, |s| Ok(s.to_vec()))?,
            None => Vec::new(),
        };
        let mut out = vec![0f32; xs.len()];
        let rows = rows_per_task(xs.len() / n.max(1), n, 16 * 1024);
        out.par_chunks_mut(rows * n)
            .zip(xs.par_chunks(rows * n))
            .for_each(|(o, xr)| gelu_rows(xr, &bias_vec, o, n));
        output(out, shape)
    })
}

multiversion! {
    /// One batch row's LayerNorm (no affine) then `y·scale1 + shift` over its rows of `d`.
    fn norm_modulate_rows(
        x: &[f32],
        scale1: &[f32],
        shift: &[f32],
        out: &mut [f32],
        d: usize,
        eps: f32,
    ) {
        let inv_d = d as f32;
        for (xr, orow) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = sum16(xr) / inv_d;
            for (o, &v) in orow.iter_mut().zip(xr) {
                *o = v - mean;
            }
            let mut acc = [0f32; 16];
            let mut chunks = orow.chunks_exact(16);
            for c in &mut chunks {
                for i in 0..16 {
                    acc[i] += c[i] * c[i];
                }
            }
            let mut tail = 0f32;
            for &v in chunks.remainder() {
                tail += v * v;
            }
            let var = (acc.iter().sum::<f32>() + tail) / inv_d;
            let denom = (var + eps).sqrt();
            for ((o, &s1), &sh) in orow.iter_mut().zip(scale1).zip(shift) {
                *o = *o / denom * s1 + sh;
            }
        }
    }
}

/// `LayerNorm(x)·(1 + scale) + shift` over the last dimension (no affine parameters; two-pass
/// mean and variance in f32), x (B, N, D), shift and scale (B, 1, D). PixArt's adaLN
/// modulation of a block's input.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let cond_ok = |t: &Tensor| t.dims() == [b, 1, d];
    if !fast_path(&[x, shift, scale]) || !cond_ok(shift) || !cond_ok(scale) {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        return normed.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift);
    }
    with_f32(x, |xs| {
        with_f32(shift, |sh| {
            with_f32(scale, |sc| {
                let scale1: Vec<f32> = sc.iter().map(|&s| s + 1.0).collect();
                let mut out = vec![0f32; xs.len()];
                let rows = rows_per_task(n, d, 8 * 1024);
                let per_batch = n * d;
                out.par_chunks_mut(per_batch)
                    .zip(xs.par_chunks(per_batch))
                    .enumerate()
                    .flat_map(|(bi, (o, xr))| {
                        o.par_chunks_mut(rows * d)
                            .zip(xr.par_chunks(rows * d))
                            .map(move |pair| (bi, pair))
                    })
                    .for_each(|(bi, (o, xr))| {
                        let s1 = &scale1[bi * d..(bi + 1) * d];
                        let shb = &sh[bi * d..(bi + 1) * d];
                        norm_modulate_rows(xr, s1, shb, o, d, eps as f32)
                    });
                output(out, (b, n, d))
            })
        })
    })
}

multiversion! {
    /// out = residual + gate·(y + bias) over rows of `d`; an empty `gate` is no gate, an
    /// empty `bias` no bias.
    fn gated_rows(
        residual: &[f32],
        gate: &[f32],
        y: &[f32],
        bias: &[f32],
        out: &mut [f32],
        d: usize,
    ) {
        for ((orow, rr), yr) in out
            .chunks_exact_mut(d)
            .zip(residual.chunks_exact(d))
            .zip(y.chunks_exact(d))
        {
            match (gate.is_empty(), bias.is_empty()) {
                (false, false) => {
                    for ((((o, &r), &g), &v), &bv) in
                        orow.iter_mut().zip(rr).zip(gate).zip(yr).zip(bias)
                    {
                        *o = g * (v + bv) + r;
                    }
                }
                (false, true) => {
                    for (((o, &r), &g), &v) in orow.iter_mut().zip(rr).zip(gate).zip(yr) {
                        *o = g * v + r;
                    }
                }
                (true, false) => {
                    for (((o, &r), &v), &bv) in orow.iter_mut().zip(rr).zip(yr).zip(bias) {
                        *o = (v + bv) + r;
                    }
                }
                (true, true) => {
                    for ((o, &r), &v) in orow.iter_mut().zip(rr).zip(yr) {
                        *o = v + r;
                    }
                }
            }
        }
    }
}

/// `residual + gate·(y + bias)`: residual and y (B, N, D), gate (B, 1, D) or none, bias (D) or
/// none. The (gated) residual connection of a transformer block, with the bias of the layer
/// that made y.
pub fn gated_residual(
    residual: &Tensor,
    gate: Option<&Tensor>,
    y: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, n, d) = residual.dims3()?;
    let bias_ok = bias.is_none_or(|t| fast_path(&[t]) && t.elem_count() == d);
    let gate_ok = gate.is_none_or(|g| fast_path(&[g]) && g.dims() == [b, 1, d]);
    if !fast_path(&[residual, y]) || y.dims() != [b, n, d] || !bias_ok || !gate_ok {
        let y = match bias {
            Some(t) => y.broadcast_add(t)?,
            None => y.clone(),
        };
        return match gate {
            Some(g) => g.broadcast_mul(&y)?.add(residual),
            None => y.add(residual),
        };
    }
    let (gate_vec, bias_vec) = (values(gate)?, values(bias)?);
    with_f32(residual, |rs| {
        with_f32(y, |ys| {
            let mut out = vec![0f32; rs.len()];
            let rows = rows_per_task(n, d, 8 * 1024);
            let per_batch = n * d;
            out.par_chunks_mut(per_batch)
                .zip(rs.par_chunks(per_batch))
                .zip(ys.par_chunks(per_batch))
                .enumerate()
                .flat_map(|(bi, ((o, rr), yr))| {
                    o.par_chunks_mut(rows * d)
                        .zip(rr.par_chunks(rows * d))
                        .zip(yr.par_chunks(rows * d))
                        .map(move |t| (bi, t))
                })
                .for_each(|(bi, ((o, rr), yr))| {
                    let g: &[f32] = if gate_vec.is_empty() {
                        &[]
                    } else {
                        &gate_vec[bi * d..(bi + 1) * d]
                    };
                    gated_rows(rr, g, yr, &bias_vec, o, d)
                });
            output(out, (b, n, d))
        })
    })
}

multiversion! {
    /// Softmax of `s·scale + bias` over rows of `l`; `bias` is one row or empty.
    fn softmax_rows(s: &[f32], bias: &[f32], out: &mut [f32], l: usize, scale: f32) {
        for (sr, orow) in s.chunks_exact(l).zip(out.chunks_exact_mut(l)) {
            if bias.is_empty() {
                for (o, &v) in orow.iter_mut().zip(sr) {
                    *o = v * scale;
                }
            } else {
                for ((o, &v), &bv) in orow.iter_mut().zip(sr).zip(bias) {
                    *o = v * scale + bv;
                }
            }
            let max = max16(orow);
            for o in orow.iter_mut() {
                *o = exp_f32(*o - max);
            }
            let sum = sum16(orow);
            for o in orow.iter_mut() {
                *o /= sum;
            }
        }
    }
}

/// `softmax(scores·scale + bias)` over the last dimension, in f32. scores (B, H, S, L); bias
/// broadcastable to it with only batch and key dimensions, e.g. (B, 1, 1, L) (or None).
pub fn scaled_masked_softmax(scores: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let fallback = || -> Result<Tensor> {
        let s = (scores.to_dtype(DType::F32)? * scale)?;
        let s = match bias {
            Some(b) => s.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => s,
        };
        candle_nn::ops::softmax_last_dim(&s)
    };
    if dims.len() != 4 || !fast_path(&[scores]) {
        return fallback();
    }
    let (b, h, s, l) = (dims[0], dims[1], dims[2], dims[3]);
    let bias = match bias {
        None => None,
        Some(t) => {
            let bd = t.dims();
            let per_batch = bd.len() == 4
                && (bd[0] == b || bd[0] == 1)
                && bd[1] == 1
                && bd[2] == 1
                && bd[3] == l;
            if !per_batch || !fast_path(&[t]) {
                return fallback();
            }
            Some(with_f32(t, |v| Ok((bd[0], v.to_vec())))?)
        }
    };
    with_f32(scores, |ss| {
        let mut out = vec![0f32; ss.len()];
        let per_batch = h * s * l;
        let rows = rows_per_task(b * h * s, l, 8 * 1024).min(h * s);
        let rows = (1..=rows).rev().find(|r| (h * s) % r == 0).unwrap_or(1);
        let scale = scale as f32;
        out.par_chunks_mut(rows * l)
            .zip(ss.par_chunks(rows * l))
            .enumerate()
            .for_each(|(task, (o, sr))| {
                let batch = task * rows * l / per_batch;
                let brow: &[f32] = match &bias {
                    None => &[],
                    Some((1, v)) => v,
                    Some((_, v)) => &v[batch * l..(batch + 1) * l],
                };
                softmax_rows(sr, brow, o, l, scale)
            });
        output(out, dims.as_slice())
    })
}

/// Splits (B, N, P·H·Dh) projections into P tensors (B, H, N, Dh), contiguous, adding `bias`
/// (P·H·Dh) on the way: the head split of fused q/k/v projections in one pass.
pub fn split_heads(
    x: &Tensor,
    bias: Option<&Tensor>,
    parts: usize,
    heads: usize,
) -> Result<Vec<Tensor>> {
    let (b, n, width) = x.dims3()?;
    if parts == 0 || heads == 0 || !width.is_multiple_of(parts * heads) {
        candle_core::bail!("split_heads: width {width} is not {parts} parts of {heads} heads");
    }
    let dh = width / (parts * heads);
    let bias_ok = bias.is_none_or(|t| fast_path(&[t]) && t.elem_count() == width);
    if !fast_path(&[x]) || !bias_ok {
        let x = match bias {
            Some(t) => x.broadcast_add(t)?,
            None => x.clone(),
        };
        return (0..parts)
            .map(|p| {
                x.narrow(2, p * heads * dh, heads * dh)?
                    .reshape((b, n, heads, dh))?
                    .transpose(1, 2)?
                    .contiguous()
            })
            .collect();
    }
    with_f32(x, |xs| {
        let bias_vec = match bias {
            Some(t) => with_f32(t, |s| Ok(s.to_vec()))?,
            None => vec![0f32; width],
        };
        let block = n * dh;
        // Output blocks (part, batch, head), each (N, Dh).
        let mut out = vec![0f32; parts * b * heads * block];
        out.par_chunks_mut(block).enumerate().for_each(|(i, o)| {
            let (p, rest) = (i / (b * heads), i % (b * heads));
            let (bi, hi) = (rest / heads, rest % heads);
            let col = (p * heads + hi) * dh;
            let bb = &bias_vec[col..col + dh];
            for (t, orow) in o.chunks_exact_mut(dh).enumerate() {
                let src = &xs[(bi * n + t) * width + col..][..dh];
                for ((ov, &sv), &bv) in orow.iter_mut().zip(src).zip(bb) {
                    *ov = sv + bv;
                }
            }
        });
        let part_len = b * heads * block;
        out.chunks_exact(part_len)
            .map(|c| output(c.to_vec(), (b, heads, n, dh)))
            .collect()
    })
}

/// A pointer that rayon tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used where every task writes its own disjoint elements.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// Where [`fused_attention`] writes each head's output rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadsLayout {
    /// (B, H, S, Dh): the processors' layout.
    Split,
    /// (B, S, H·Dh): the layout the output projection reads.
    Merged,
}

/// `softmax(q·kᵀ·scale + bias)·v` with the heads merged: q (B, H, S, Dh), k and v (B, H, L,
/// Dh), bias broadcastable with only batch and key dimensions ((B, 1, 1, L), (1, 1, 1, L)) or
/// None -> (B, S, H·Dh), the layout the output projection reads.
///
/// For f32 CPU tensors each (batch, head) is one task: its scores (S, L) stay in cache from
/// q·kᵀ through the softmax to p·v, and p·v is written straight into the merged layout. Other
/// inputs go through [`crate::attention::scaled_dot_product_attention`] and a head merge.
pub fn attention_merged(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    if let Some(out) = fused_attention(q, k, v, bias, scale, HeadsLayout::Merged)? {
        return Ok(out);
    }
    let (b, h, s, dh) = q.dims4()?;
    let out = crate::attention::scaled_dot_product_attention(q, k, v, bias, scale)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    out.transpose(1, 2)?.contiguous()?.reshape((b, s, h * dh))
}

/// The same attention in the (B, H, S, Dh) layout, fused as [`attention_merged`]; None when
/// the inputs are not f32 CPU tensors of that layout (the caller computes it with candle ops).
pub fn attention_split_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    fused_attention(q, k, v, bias, scale, HeadsLayout::Split)
}

/// `dst (m×n) = lhs (m×k)·rhs (k×n)`, or `dst += …` with `accumulate`, split as
/// `parallelism` says; every matrix given by its pointer and (row, column) strides.
///
/// # Safety
/// Every pointer must be valid for the elements its strides and sizes reach, and `dst` must
/// not be read or written by anyone else meanwhile (nor read at all without `accumulate`).
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

multiversion! {
    /// The sum of `x`, or with `centre` the sum of (x − centre)², in f64: f32 partial sums
    /// over blocks of 1024 values (16 lanes each), added up in f64.
    fn block_sums(x: &[f32], centre: f32, squares: bool, total: &mut f64) {
        for block in x.chunks(1024) {
            let mut lanes = [0f32; 16];
            let mut parts = block.chunks_exact(16);
            for part in parts.by_ref() {
                for (l, &v) in lanes.iter_mut().zip(part) {
                    let d = v - centre;
                    *l += if squares { d * d } else { v };
                }
            }
            let mut sum: f64 = lanes.iter().map(|&l| l as f64).sum();
            for &v in parts.remainder() {
                let d = v - centre;
                sum += if squares { (d * d) as f64 } else { v as f64 };
            }
            *total += sum;
        }
    }
}

multiversion! {
    /// out = (x − centre)·scale + shift, then SiLU (v / (1 + e^−v)) when `silu`.
    fn centre_scale_silu(x: &[f32], centre: f32, scale: f32, shift: f32, silu: bool, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            let y = (v - centre) * scale + shift;
            *o = if silu { y / (1.0 + exp_f32(-y)) } else { y };
        }
    }
}

/// GroupNorm's statistics for `x` (B, C, …) whose C channels form `groups` consecutive groups:
/// the per (batch, group) sums of x, or with `mean` (B, groups, 1) the sums of (x − mean)²,
/// as a (B, groups, 1) f32 tensor. Sums are kept as sums (not divided) so that the bands of a
/// split image can add theirs up before dividing (the patch-parallel VAE's all-reduce). On
/// the kernel path they are accumulated in f64 from f32 partial sums.
pub fn group_sums(x: &Tensor, groups: usize, mean: Option<&Tensor>) -> Result<Tensor> {
    let b = x.dim(0)?;
    let c = x.dim(1)?;
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_sums: {c} channels in {groups} groups");
    }
    let per_group = x.elem_count() / (b * groups).max(1);
    if !fast_path(&[x]) || mean.is_some_and(|m| !fast_path(&[m])) {
        let xg = x.reshape((b, groups, per_group))?.to_dtype(DType::F32)?;
        return match mean {
            Some(mean) => xg.broadcast_sub(mean)?.sqr()?.sum_keepdim(2),
            None => xg.sum_keepdim(2),
        };
    }
    let centres = match mean {
        Some(m) => values(Some(m))?,
        None => vec![0.0; b * groups],
    };
    with_f32(x, |xs| {
        let sums: Vec<f32> = xs
            .par_chunks(per_group.max(1))
            .zip(centres.par_iter())
            .map(|(chunk, &centre)| {
                let mut total = 0f64;
                block_sums(chunk, centre, mean.is_some(), &mut total);
                total as f32
            })
            .collect();
        output(sums, (b, groups, 1))
    })
}

/// GroupNorm's output, SiLU optionally fused: (x − mean) / sqrt(var + eps) · weight[c] +
/// bias[c] for `x` (B, C, …), its channels in `groups` consecutive groups, `mean` and `var`
/// (B, groups, 1) f32 (from [`group_sums`]), `weight` and `bias` (C); then SiLU when `silu`.
/// One pass over x on the kernel path ((x − mean)·scale + bias[c] per channel, the centring
/// first so that a large mean costs no precision); otherwise candle's ops, normalizing in f32
/// and returning x's dtype.
#[allow(clippy::too_many_arguments)] // GroupNorm's own parameters, all needed
pub fn group_norm_apply(
    x: &Tensor,
    groups: usize,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm_apply: {c} channels in {groups} groups");
    }
    let plane = x.elem_count() / (b * c).max(1);
    let affine_shape: Vec<usize> = [1, c]
        .into_iter()
        .chain((2..dims.len()).map(|_| 1))
        .collect();
    if !fast_path(&[x, weight, bias]) || !is_cpu_f32(mean) || !is_cpu_f32(var) {
        let xg = x
            .reshape((b, groups, c / groups * plane))?
            .to_dtype(DType::F32)?;
        let normed = xg
            .broadcast_sub(mean)?
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .to_dtype(x.dtype())?
            .reshape(dims.as_slice())?
            .broadcast_mul(&weight.reshape(affine_shape.as_slice())?)?
            .broadcast_add(&bias.reshape(affine_shape.as_slice())?)?;
        return match silu {
            true => candle_nn::ops::silu(&normed),
            false => Ok(normed),
        };
    }
    let (mean, var) = (values(Some(mean))?, values(Some(var))?);
    with_f32(weight, |wv| {
        with_f32(bias, |bv| {
            with_f32(x, |xs| {
                let mut out = vec![0f32; xs.len()];
                out.par_chunks_mut(plane.max(1))
                    .zip(xs.par_chunks(plane.max(1)))
                    .enumerate()
                    .for_each(|(i, (o, xp))| {
                        let (bi, ch) = (i / c, i % c);
                        let g = bi * groups + ch / (c / groups);
                        let rstd = 1.0 / (var[g] as f64 + eps).sqrt();
                        let scale = (rstd * wv[ch] as f64) as f32;
                        centre_scale_silu(xp, mean[g], scale, bv[ch], silu, o);
                    });
                output(out, dims.as_slice())
            })
        })
    })
}

/// A 1×1 convolution: `x` (B, Ci, H, W), `w` (Co, Ci, 1, 1), `bias` (Co) or none ->
/// (B, Co, H, W), what candle's `x.conv2d(w, 0, 1, 1, 1)` computes, plus the bias. Per batch
/// entry one `gemm` of the (Co, Ci) weight by the (Ci, H·W) input read in place, into the
/// output with the bias written first; candle's CPU path copies the whole input and the
/// whole output once more each.
pub fn conv1x1(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, ci, h, wd) = x.dims4()?;
    let co = w.dim(0)?;
    if w.dims() != [co, ci, 1, 1] || bias.is_some_and(|t| t.dims() != [co]) {
        candle_core::bail!(
            "conv1x1: input {:?}, weight {:?} and bias {:?} do not make a 1x1 convolution",
            x.dims(),
            w.dims(),
            bias.map(|t| t.dims().to_vec())
        );
    }
    if !is_cpu_f32(x) || !is_cpu_f32(w) || bias.is_some_and(|t| !is_cpu_f32(t)) {
        return plus_channel_bias(x.conv2d(w, 0, 1, 1, 1)?, bias);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let bias = values(bias)?;
    let plane = h * wd;
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    with_f32(&x, |xs| {
        with_f32(&w, |ws| {
            let mut out = vec![0f32; b * co * plane];
            if !bias.is_empty() {
                for (row, &v) in out.chunks_exact_mut(plane.max(1)).zip(bias.iter().cycle()) {
                    row.fill(v);
                }
            }
            for (o, xb) in out
                .chunks_exact_mut((co * plane).max(1))
                .zip(xs.chunks_exact((ci * plane).max(1)))
            {
                // SAFETY: o is (Co, H·W), xb (Ci, H·W) and ws (Co, Ci), all row-major and in
                // bounds; o is written (and read back, with a bias) by this call alone.
                unsafe {
                    gemm_strided(
                        (co, plane, ci),
                        (o.as_mut_ptr(), plane, 1),
                        (ws.as_ptr(), ci, 1),
                        (xb.as_ptr(), plane, 1),
                        !bias.is_empty(),
                        parallelism,
                    );
                }
            }
            output(out, (b, co, h, wd))
        })
    })
}

/// Values of one task's patch matrix in [`conv3x3`]: a strip of output rows is sized so
/// that its patch matrix stays near this (4 MiB; 1 MiB and 16 MiB were both slower on the VAE
/// decoder).
const CONV_PATCH_VALUES: usize = 1 << 20;

/// The input of [`conv3x3`]: `rows` (B, Ci, H, W) of an image, the image's rows just above
/// and just below them (each (B, Ci, 1, W); None where the image ends, read as zeros, as a
/// padding-1 convolution reads them), and whether the convolution reads all of it
/// nearest-neighbour upsampled 2× in both directions (diffusers' `Upsample2D`: interpolate,
/// then convolve), without the upsampled copy being made.
#[derive(Debug, Clone, Copy)]
pub struct ConvInput<'a> {
    pub rows: &'a Tensor,
    pub above: Option<&'a Tensor>,
    pub below: Option<&'a Tensor>,
    pub upsample: bool,
}

impl<'a> ConvInput<'a> {
    /// A whole image, not upsampled.
    pub fn whole(x: &'a Tensor) -> Self {
        Self {
            rows: x,
            above: None,
            below: None,
            upsample: false,
        }
    }
}

/// A 3×3, stride-1, padding-1 convolution of `input` with a (Co, Ci, 3, 3) weight and an
/// optional (Co) bias -> (B, Co, H, W), or (B, Co, 2H, 2W) upsampled. For a whole image it is
/// candle's `x.conv2d(w, 1, 1, 1, 1)` plus the bias (of `x.upsample_nearest2d(2H, 2W)` when
/// upsampling); for a band of rows with its neighbours' rows, those rows of the whole image's
/// (the patch-parallel VAE's halo).
///
/// Written here because candle's CPU `conv2d` spends most of its time outside the matrix
/// product: it transposes the whole input to channels-last and gathers each 3×3 patch value by
/// value into tiles of 512 pixels, then scatters each tile's output back, which leaves the VAE
/// decoder about twice as slow as with this kernel (docs/performance.md). Here the patch
/// matrix of a strip of output rows, (9·Ci, rows·W) in the weight's (Ci, kh, kw) order, is
/// built from whole image rows (a slice copy per input channel, kernel offset and output row;
/// the padding written as zeros and the upsampling as repeated values, so neither a padded nor
/// an upsampled copy of the input is made), and one `gemm` per strip writes its (Co, rows·W)
/// block straight into the output, bias included. Strips run in parallel; with fewer strips
/// than threads, the product itself is parallel.
pub fn conv3x3(input: ConvInput, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let ConvInput {
        rows: x,
        above,
        below,
        upsample,
    } = input;
    let (b, ci, h_in, w_in) = x.dims4()?;
    let co = w.dim(0)?;
    if w.dims() != [co, ci, 3, 3] || h_in == 0 || w_in == 0 {
        candle_core::bail!(
            "conv3x3: input {:?} and weight {:?} do not make a 3x3 convolution",
            x.dims(),
            w.dims()
        );
    }
    for row in [above, below].into_iter().flatten() {
        if row.dims() != [b, ci, 1, w_in] {
            candle_core::bail!("conv3x3: halo row {:?} for rows {:?}", row.dims(), x.dims());
        }
    }
    if let Some(bias) = bias {
        if bias.dims() != [co] {
            candle_core::bail!("conv3x3: bias {:?} for {co} channels", bias.dims());
        }
    }
    let factor = if upsample { 2 } else { 1 };
    let (h, wd) = (factor * h_in, factor * w_in);
    let on_kernel = [Some(x), above, below, Some(w), bias]
        .into_iter()
        .flatten()
        .all(is_cpu_f32);
    if !on_kernel {
        let edge = |row: Option<&Tensor>| match row {
            Some(r) => r.upsample_nearest2d(1, wd),
            None => Tensor::zeros((b, ci, 1, wd), x.dtype(), x.device()),
        };
        let x = x.upsample_nearest2d(h, wd)?;
        let padded = Tensor::cat(&[edge(above)?, x, edge(below)?], 2)?;
        return plus_channel_bias(padded.pad_with_zeros(3, 1, 1)?.conv2d(w, 0, 1, 1, 1)?, bias);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (above, below, bias) = (values(above)?, values(below)?, values(bias)?);
    let (plane_in, plane, k) = (h_in * w_in, h * wd, 9 * ci);
    // At most a quarter of the image per strip, so that the patch matrices' memory scales
    // with the image (a rank's band) even where it is smaller than the budget.
    let rows = (CONV_PATCH_VALUES / (k * wd)).clamp(1, h.div_ceil(4));
    let strips = h.div_ceil(rows);
    let tasks = b * strips;
    let threads = rayon::current_num_threads().max(1);
    let inner = if tasks < threads {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    with_f32(&x, |xs| {
        with_f32(&w, |ws| {
            let mut out: Vec<f32> = Vec::with_capacity(b * co * plane);
            // The address as an integer so that the tasks can share it; see the SAFETY below.
            let out_addr = out.as_mut_ptr() as usize;
            let run = |patch: &mut Vec<f32>, task: usize| {
                let (bi, y0) = (task / strips, (task % strips) * rows);
                let n = rows.min(h - y0) * wd;
                patch.resize(k * n, 0.0);
                for (r, dst) in patch.chunks_exact_mut(n).enumerate() {
                    let (c, kh, kw) = (r / 9, r % 9 / 3, r % 3);
                    let channel = bi * ci + c;
                    let edge = channel * w_in..(channel + 1) * w_in;
                    for (y, d) in dst.chunks_exact_mut(wd).enumerate() {
                        // Output row y0 + y reads (upsampled) input row y0 + y + kh - 1 of
                        // the padded image: -1 is `above`, h is `below` (empty, so no row,
                        // when not given).
                        let src: Option<&[f32]> = match y0 + y + kh {
                            0 => above.get(edge.clone()),
                            t if t == h + 1 => below.get(edge.clone()),
                            t => {
                                let at = channel * plane_in + (t - 1) / factor * w_in;
                                Some(&xs[at..at + w_in])
                            }
                        };
                        match (src, kw, upsample) {
                            (None, _, _) => d.fill(0.0),
                            (Some(s), 0, false) => {
                                d[0] = 0.0;
                                d[1..].copy_from_slice(&s[..wd - 1]);
                            }
                            (Some(s), 1, false) => d.copy_from_slice(s),
                            (Some(s), _, false) => {
                                d[..wd - 1].copy_from_slice(&s[1..]);
                                d[wd - 1] = 0.0;
                            }
                            // Column j reads upsampled column j + kw - 1, which is input
                            // column (j + kw - 1) / 2, or padding outside 0..2·w_in.
                            (Some(s), _, true) => {
                                for (j, o) in d.iter_mut().enumerate() {
                                    let q = j + kw;
                                    *o = if q == 0 || q > wd {
                                        0.0
                                    } else {
                                        s[(q - 1) / 2]
                                    };
                                }
                            }
                        }
                    }
                }
                let dst = (out_addr as *mut f32).wrapping_add(bi * co * plane + y0 * wd);
                // SAFETY: this task alone writes the (Co, n) block at `dst` (rows of n values,
                // `plane` apart), inside `out`'s capacity of B·Co·H·W; the bias fill writes
                // the same block before gemm reads it back (accumulate), and without a bias
                // gemm only writes it. The patch is (k, n) row-major and w (Co, k) row-major.
                unsafe {
                    for (j, &v) in bias.iter().enumerate() {
                        std::slice::from_raw_parts_mut(dst.add(j * plane), n).fill(v);
                    }
                    gemm_strided(
                        (co, n, k),
                        (dst, plane, 1),
                        (ws.as_ptr(), k, 1),
                        (patch.as_ptr(), n, 1),
                        !bias.is_empty(),
                        inner,
                    );
                }
            };
            if tasks < threads {
                let mut patch = Vec::new();
                (0..tasks).for_each(|t| run(&mut patch, t));
            } else {
                (0..tasks).into_par_iter().for_each_init(Vec::new, run);
            }
            // SAFETY: the tasks above wrote every one of the B·Co·H·W values.
            unsafe { out.set_len(b * co * plane) };
            output(out, (b, co, h, wd))
        })
    })
}

/// [`gemm_strided`] on the calling thread alone.
///
/// # Safety
/// As for [`gemm_strided`].
unsafe fn gemm_1t(
    dims: (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    accumulate: bool,
) {
    gemm_strided(dims, dst, lhs, rhs, accumulate, gemm::Parallelism::None)
}

/// The fused attention of [`attention_merged`], writing `layout`; None when the inputs do not
/// fit the kernel.
fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    layout: HeadsLayout,
) -> Result<Option<Tensor>> {
    let (b, h, s, dh) = q.dims4()?;
    let l = k.dim(2)?;
    let bias_ok = bias.is_none_or(|t| {
        let bd = t.dims();
        fast_path(&[t])
            && bd.len() == 4
            && (bd[0] == b || bd[0] == 1)
            && bd[1] == 1
            && bd[2] == 1
            && bd[3] == l
    });
    let shapes_ok = k.dims() == [b, h, l, dh] && v.dims() == [b, h, l, dh];
    if !fast_path(&[q, k, v]) || !bias_ok || !shapes_ok || l == 0 {
        return Ok(None);
    }
    let bias = match bias {
        None => None,
        Some(t) => Some((t.dim(0)?, with_f32(t, |v| Ok(v.to_vec()))?)),
    };
    // Where head (bi, hi)'s output rows start, and their stride.
    let (head_offset, row_stride) = match layout {
        HeadsLayout::Merged => ((s * h * dh, dh), h * dh),
        HeadsLayout::Split => ((h * s * dh, s * dh), dh),
    };
    let out = with_f32(q, |qs| {
        with_f32(k, |ks| {
            with_f32(v, |vs| {
                let mut out = vec![0f32; b * s * h * dh];
                let dst = SharedMut(out.as_mut_ptr());
                let scale = scale as f32;
                (0..b * h).into_par_iter().for_each_init(
                    || (vec![0f32; s * l], vec![0f32; s * l]),
                    |(scores, probs), task| {
                        let (bi, hi) = (task / h, task % h);
                        let (qo, ko) = (task * s * dh, task * l * dh);
                        let oo = bi * head_offset.0 + hi * head_offset.1;
                        // SAFETY: slices and strides stay inside the buffers; the output
                        // block (rows of batch bi, columns of head hi) is this task's alone.
                        unsafe {
                            gemm_1t(
                                (s, l, dh),
                                (scores.as_mut_ptr(), l, 1),
                                (qs[qo..].as_ptr(), dh, 1),
                                (ks[ko..].as_ptr(), 1, dh),
                                false,
                            );
                        }
                        let brow: &[f32] = match &bias {
                            None => &[],
                            Some((1, v)) => v,
                            Some((_, v)) => &v[bi * l..(bi + 1) * l],
                        };
                        softmax_rows(scores, brow, probs, l, scale);
                        unsafe {
                            gemm_1t(
                                (s, dh, l),
                                (dst.ptr().add(oo), row_stride, 1),
                                (probs.as_ptr(), l, 1),
                                (vs[ko..].as_ptr(), dh, 1),
                                false,
                            );
                        }
                    },
                );
                Ok(out)
            })
        })
    })?;
    let out = match layout {
        HeadsLayout::Merged => output(out, (b, s, h * dh))?,
        HeadsLayout::Split => output(out, (b, h, s, dh))?,
    };
    Ok(Some(out))
}

multiversion! {
    /// One block of keys into a running softmax: `scores` (rows of `l`) scaled, each row's
    /// running max and sum updated, its previous output row rescaled, and the block's
    /// unnormalised probabilities written to `probs`.
    fn online_softmax_rows(
        scores: &[f32],
        probs: &mut [f32],
        max: &mut [f32],
        sum: &mut [f32],
        out: &mut [f32],
        scale: f32,
    ) {
        // One running max, sum and output row per query row.
        let (l, dh) = (scores.len() / max.len(), out.len() / max.len());
        let rows = scores.chunks_exact(l).zip(probs.chunks_exact_mut(l));
        let state = max.iter_mut().zip(sum.iter_mut()).zip(out.chunks_exact_mut(dh));
        for ((sr, pr), ((m, total), orow)) in rows.zip(state) {
            for (p, &v) in pr.iter_mut().zip(sr) {
                *p = v * scale;
            }
            let new_max = m.max(max16(pr));
            // e^(old max − new max) rescales what earlier blocks contributed (0 before any).
            let keep = if *m == f32::NEG_INFINITY { 0.0 } else { exp_f32(*m - new_max) };
            for p in pr.iter_mut() {
                *p = exp_f32(*p - new_max);
            }
            *total = *total * keep + sum16(pr);
            *m = new_max;
            for o in orow.iter_mut() {
                *o *= keep;
            }
        }
    }
}

/// Attention over keys that arrive block by block (ring attention), without a log-sum-exp
/// merge per block: per query row it keeps the running max of the scaled scores, the running
/// sum of their exponentials and the unnormalised output (the online softmax of
/// FlashAttention), one (batch, head) per task as in [`attention_merged`].
///
/// Only for f32 CPU tensors: [`OnlineAttention::new`] says None otherwise, and the caller
/// computes each block with candle ops instead.
#[derive(Debug)]
pub struct OnlineAttention {
    q: Tensor,
    dims: (usize, usize, usize, usize),
    scale: f32,
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl OnlineAttention {
    /// Starts the attention of `q` (B, H, S, Dh), with no keys yet; None when q is not an f32
    /// CPU tensor.
    pub fn new(q: &Tensor, scale: f64) -> Result<Option<Self>> {
        if !is_cpu_f32(q) {
            return Ok(None);
        }
        let dims = q.dims4()?;
        let (b, h, s, dh) = dims;
        Ok(Some(Self {
            q: q.contiguous()?,
            dims,
            scale: scale as f32,
            out: vec![0f32; b * h * s * dh],
            max: vec![f32::NEG_INFINITY; b * h * s],
            sum: vec![0f32; b * h * s],
        }))
    }

    /// Adds the first `keys` positions of the block k, v (B, H, L, Dh); false (and nothing
    /// added) when the block is not an f32 CPU tensor of that shape with `keys` ≤ L.
    pub fn add_block(&mut self, k: &Tensor, v: &Tensor, keys: usize) -> Result<bool> {
        let (b, h, s, dh) = self.dims;
        let l = k.dim(2)?;
        let fits = k.dims() == [b, h, l, dh] && v.dims() == [b, h, l, dh] && keys <= l;
        if !fits || !fast_path(&[k, v]) {
            return Ok(false);
        }
        if keys == 0 {
            return Ok(true);
        }
        let scale = self.scale;
        let (out, max, sum) = (&mut self.out, &mut self.max, &mut self.sum);
        with_f32(&self.q, |qs| {
            with_f32(k, |ks| {
                with_f32(v, |vs| {
                    out.par_chunks_mut(s * dh)
                        .zip(max.par_chunks_mut(s))
                        .zip(sum.par_chunks_mut(s))
                        .enumerate()
                        .for_each_init(
                            || (vec![0f32; s * keys], vec![0f32; s * keys]),
                            |(scores, probs), (task, ((o, m), total))| {
                                let (qo, ko) = (task * s * dh, task * l * dh);
                                // SAFETY: every slice holds the rows its strides reach; o is
                                // this task's own.
                                unsafe {
                                    gemm_1t(
                                        (s, keys, dh),
                                        (scores.as_mut_ptr(), keys, 1),
                                        (qs[qo..].as_ptr(), dh, 1),
                                        (ks[ko..].as_ptr(), 1, dh),
                                        false,
                                    );
                                }
                                online_softmax_rows(scores, probs, m, total, o, scale);
                                unsafe {
                                    gemm_1t(
                                        (s, dh, keys),
                                        (o.as_mut_ptr(), dh, 1),
                                        (probs.as_ptr(), keys, 1),
                                        (vs[ko..].as_ptr(), dh, 1),
                                        true,
                                    );
                                }
                            },
                        );
                    Ok(())
                })
            })
        })?;
        Ok(true)
    }

    /// The attention output (B, H, S, Dh): the accumulated output over the sum of weights;
    /// an error when no key was added.
    pub fn finish(self) -> Result<Tensor> {
        let (b, h, s, dh) = self.dims;
        if self.sum.contains(&0.0) {
            candle_core::bail!("online attention: a query row saw no keys");
        }
        let mut out = self.out;
        out.par_chunks_mut(dh)
            .zip(self.sum.par_iter())
            .for_each(|(row, &total)| row.iter_mut().for_each(|o| *o /= total));
        output(out, (b, h, s, dh))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
    }

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn conv3x3_matches_candle_on_whole_images_and_bands() {
        // (batch, in, out, height, width): one strip, several strips with a short last one, a
        // batch of two, a one-pixel image; each plain and upsampled.
        for (b, ci, co, h, w) in [
            (1, 3, 5, 4, 5),
            (1, 64, 8, 38, 32),
            (2, 16, 12, 64, 18),
            (1, 4, 2, 1, 1),
        ] {
            for upsample in [false, true] {
                let x = randn(&[b, ci, h, w]);
                let wt = randn(&[co, ci, 3, 3]);
                let bias = randn(&[co]);
                let f = if upsample { 2 } else { 1 };
                let plain = x
                    .upsample_nearest2d(f * h, f * w)
                    .unwrap()
                    .conv2d(&wt, 1, 1, 1, 1)
                    .unwrap();
                let with_bias = plain
                    .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                    .unwrap();
                let input = |rows, above, below| ConvInput {
                    rows,
                    above,
                    below,
                    upsample,
                };
                let whole = input(&x, None, None);
                let what = format!("{b}x{ci}x{h}x{w} upsample {upsample}");
                assert!(
                    rel(&conv3x3(whole, &wt, None).unwrap(), &plain) < 1e-6,
                    "{what}"
                );
                let got = conv3x3(whole, &wt, Some(&bias)).unwrap();
                assert!(rel(&got, &with_bias) < 1e-6, "{what}");
                // A strided view gives the same values.
                let xt = x.transpose(2, 3).unwrap().contiguous().unwrap();
                let xt = xt.transpose(2, 3).unwrap();
                let got = conv3x3(input(&xt, None, None), &wt, Some(&bias)).unwrap();
                assert!(rel(&got, &with_bias) < 1e-6, "{what}, strided");
                // Bands of rows with their neighbours' rows (top, middle, bottom), on the
                // kernel (f32) and on candle's path (f64).
                let bands = match h >= 3 {
                    true => vec![(0, h / 3), (h / 3, 2 * h / 3), (2 * h / 3, h), (0, h)],
                    false => vec![(0, h)],
                };
                for (from, to) in bands {
                    let expect = with_bias.narrow(2, f * from, f * (to - from)).unwrap();
                    for dt in [DType::F32, DType::F64] {
                        let x = x.to_dtype(dt).unwrap();
                        let row = |r: usize| x.narrow(2, r, 1).unwrap();
                        let above = (from > 0).then(|| row(from - 1));
                        let below = (to < h).then(|| row(to));
                        let rows = x.narrow(2, from, to - from).unwrap();
                        let band = ConvInput {
                            rows: &rows,
                            above: above.as_ref(),
                            below: below.as_ref(),
                            upsample,
                        };
                        let got = conv3x3(
                            band,
                            &wt.to_dtype(dt).unwrap(),
                            Some(&bias.to_dtype(dt).unwrap()),
                        )
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap();
                        assert!(
                            rel(&got, &expect) < 1e-6,
                            "{what}: rows {from}..{to} {dt:?}"
                        );
                    }
                }
            }
        }
        let x = randn(&[1, 3, 6, 6]);
        let whole = ConvInput::whole(&x);
        assert!(conv3x3(whole, &randn(&[4, 2, 3, 3]), None).is_err());
        assert!(conv3x3(whole, &randn(&[4, 3, 3, 3]), Some(&randn(&[3]))).is_err());
        let wrong_row = randn(&[1, 3, 1, 5]);
        let halo = ConvInput {
            above: Some(&wrong_row),
            ..whole
        };
        assert!(conv3x3(halo, &randn(&[4, 3, 3, 3]), None).is_err());
    }

    #[test]
    fn conv1x1_matches_candle() {
        for (b, ci, co, h, w) in [(1, 8, 5, 6, 7), (2, 32, 16, 9, 4)] {
            let x = randn(&[b, ci, h, w]);
            let wt = randn(&[co, ci, 1, 1]);
            let bias = randn(&[co]);
            let plain = x.conv2d(&wt, 0, 1, 1, 1).unwrap();
            let with_bias = plain
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            assert!(rel(&conv1x1(&x, &wt, None).unwrap(), &plain) < 1e-6);
            assert!(rel(&conv1x1(&x, &wt, Some(&bias)).unwrap(), &with_bias) < 1e-6);
            let xt = x.transpose(2, 3).unwrap().contiguous().unwrap();
            let xt = xt.transpose(2, 3).unwrap();
            assert!(rel(&conv1x1(&xt, &wt, Some(&bias)).unwrap(), &with_bias) < 1e-6);
            let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let got = conv1x1(&to64(&x), &to64(&wt), Some(&to64(&bias))).unwrap();
            assert!(rel(&got.to_dtype(DType::F32).unwrap(), &with_bias) < 1e-6);
        }
        let x = randn(&[1, 3, 2, 2]);
        assert!(conv1x1(&x, &randn(&[4, 2, 1, 1]), None).is_err());
        assert!(conv1x1(&x, &randn(&[4, 3, 1, 1]), Some(&randn(&[3]))).is_err());
    }

    #[test]
    fn group_norm_kernels_match_candle_ops() {
        for (b, c, h, w, groups) in [(1, 32, 9, 7, 8), (2, 64, 33, 40, 32), (1, 4, 1, 1, 2)] {
            let x = ((randn(&[b, c, h, w]) * 3.0).unwrap() + 50.0).unwrap();
            let weight = randn(&[c]);
            let bias = randn(&[c]);
            let per = c / groups * h * w;
            let xg = x.reshape((b, groups, per)).unwrap();
            let sums = xg.sum_keepdim(2).unwrap();
            let mean = (&sums / per as f64).unwrap();
            let squares = xg
                .broadcast_sub(&mean)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_keepdim(2)
                .unwrap();
            let var = (&squares / per as f64).unwrap();
            assert!(rel(&group_sums(&x, groups, None).unwrap(), &sums) < 1e-6);
            assert!(rel(&group_sums(&x, groups, Some(&mean)).unwrap(), &squares) < 1e-6);
            let norm =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, 1e-6).unwrap();
            let expect = candle_core::Module::forward(&norm, &x).unwrap();
            for silu in [false, true] {
                let expect = match silu {
                    true => candle_nn::ops::silu(&expect).unwrap(),
                    false => expect.clone(),
                };
                let got =
                    group_norm_apply(&x, groups, &mean, &var, 1e-6, &weight, &bias, silu).unwrap();
                assert!(rel(&got, &expect) < 1e-6, "{b}x{c}x{h}x{w} silu {silu}");
                // candle's path (f64 input) agrees too.
                let x64 = x.to_dtype(DType::F64).unwrap();
                let (w64, b64) = (
                    weight.to_dtype(DType::F64).unwrap(),
                    bias.to_dtype(DType::F64).unwrap(),
                );
                let mean64 = group_sums(&x64, groups, None).unwrap();
                let mean64 = (mean64 / per as f64).unwrap();
                let var64 =
                    (group_sums(&x64, groups, Some(&mean64)).unwrap() / per as f64).unwrap();
                let got = group_norm_apply(&x64, groups, &mean64, &var64, 1e-6, &w64, &b64, silu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                assert!(rel(&got, &expect) < 1e-6, "f64, silu {silu}");
            }
        }
        assert!(group_sums(&randn(&[1, 6, 2, 2]), 4, None).is_err());
    }

    #[test]
    fn exp_is_accurate() {
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let (a, b) = (exp_f32(x), x.exp());
            assert!(((a - b) / b).abs() < 3e-7, "exp({x}): {a} vs {b}");
        }
        assert!(exp_f32(-1e4) < 1e-37 && exp_f32(-1e4) >= 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn matmul_t_matches_candle_on_every_weight_layout() {
        let x = randn(&[2, 7, 12]);
        let w = randn(&[5, 12]);
        let expect = x
            .reshape((14, 12))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .reshape((2, 7, 5))
            .unwrap();
        let friendly = gemm_friendly_weight(&w).unwrap();
        assert!(!friendly.is_contiguous(), "stored column-major");
        // A weight that is a view into a larger storage (offset and row stride).
        let wide = randn(&[6, 20]);
        let view = wide.narrow(0, 1, 5).unwrap().narrow(1, 3, 12).unwrap();
        let expect_view = x
            .reshape((14, 12))
            .unwrap()
            .matmul(&view.t().unwrap())
            .unwrap()
            .reshape((2, 7, 5))
            .unwrap();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                assert!(rel(&matmul_t(&x, &w).unwrap(), &expect) < 1e-6);
                assert!(rel(&matmul_t(&x, &friendly).unwrap(), &expect) < 1e-6);
                assert!(rel(&matmul_t(&x, &view).unwrap(), &expect_view) < 1e-6);
            });
        }
        // Other dtypes take candle's matmul.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        let got = matmul_t(&x64, &w64).unwrap().to_dtype(DType::F32).unwrap();
        assert!(rel(&got, &expect) < 1e-6);
    }

    #[test]
    fn online_attention_over_blocks_equals_attention_over_all_keys() {
        let q = (randn(&[2, 3, 5, 8]) * 2.0).unwrap();
        let (k, v) = (
            (randn(&[2, 3, 21, 8]) * 2.0).unwrap(),
            randn(&[2, 3, 21, 8]),
        );
        // Blocks of 7 keys, the last one holding 4 real keys then padding.
        let real = 18;
        let expect = crate::attention::scaled_dot_product_attention(
            &q.to_dtype(DType::F64).unwrap(),
            &k.narrow(2, 0, real).unwrap().to_dtype(DType::F64).unwrap(),
            &v.narrow(2, 0, real).unwrap().to_dtype(DType::F64).unwrap(),
            None,
            0.4,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
        let mut online = OnlineAttention::new(&q, 0.4).unwrap().expect("f32 CPU");
        // Out of order, as a ring visits them.
        for (start, keys) in [(14, 4), (0, 7), (7, 7)] {
            let block = |t: &Tensor| t.narrow(2, start, 7).unwrap().contiguous().unwrap();
            assert!(online.add_block(&block(&k), &block(&v), keys).unwrap());
        }
        assert!(rel(&online.finish().unwrap(), &expect) < 1e-6);

        let mut online = OnlineAttention::new(&q, 0.4).unwrap().unwrap();
        // Blocks that do not fit are refused, not half-added; no keys at all is an error.
        assert!(!online
            .add_block(&randn(&[2, 3, 7, 4]), &randn(&[2, 3, 7, 4]), 7)
            .unwrap());
        assert!(!online.add_block(&k, &v, 22).unwrap());
        assert!(online.finish().is_err());
        let q64 = q.to_dtype(DType::F64).unwrap();
        assert!(OnlineAttention::new(&q64, 0.4).unwrap().is_none());
    }

    #[test]
    fn kernels_match_candle_ops() {
        let x = randn(&[2, 37, 40]);
        let bias = randn(&[40]);
        let expect = x.broadcast_add(&bias).unwrap().gelu().unwrap();
        assert!(rel(&bias_gelu_tanh(&x, Some(&bias)).unwrap(), &expect) < 1e-6);
        let big = (randn(&[3, 50]) * 30.0).unwrap();
        assert!(rel(&bias_gelu_tanh(&big, None).unwrap(), &big.gelu().unwrap()) < 1e-6);

        let (shift, scale) = (randn(&[2, 1, 40]), randn(&[2, 1, 40]));
        let xs = x.affine(3.0, 5.0).unwrap();
        let fast = layer_norm_modulate(&xs, &shift, &scale, 1e-6).unwrap();
        let centred = xs
            .broadcast_sub(&xs.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centred
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap();
        let expect = normed
            .broadcast_mul(&(&scale + 1.0).unwrap())
            .unwrap()
            .broadcast_add(&shift)
            .unwrap();
        assert!(rel(&fast, &expect) < 1e-6);

        let gate = randn(&[2, 1, 40]);
        let y = randn(&[2, 37, 40]);
        let expect = gate
            .broadcast_mul(&y.broadcast_add(&bias).unwrap())
            .unwrap()
            .add(&x)
            .unwrap();
        assert!(
            rel(
                &gated_residual(&x, Some(&gate), &y, Some(&bias)).unwrap(),
                &expect
            ) < 1e-6
        );
        let expect = y.broadcast_add(&bias).unwrap().add(&x).unwrap();
        assert!(rel(&gated_residual(&x, None, &y, Some(&bias)).unwrap(), &expect) < 1e-6);

        let scores = randn(&[2, 3, 5, 19]);
        let mask = Tensor::from_vec(
            (0..38)
                .map(|i| if i % 7 == 3 { -10000f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            (2, 1, 1, 19),
            &Device::Cpu,
        )
        .unwrap();
        let expect = candle_nn::ops::softmax_last_dim(
            &(&scores * 0.3).unwrap().broadcast_add(&mask).unwrap(),
        )
        .unwrap();
        let got = scaled_masked_softmax(&scores, 0.3, Some(&mask)).unwrap();
        assert!(rel(&got, &expect) < 1e-6);

        let (q, k, v) = (
            randn(&[2, 3, 5, 8]),
            randn(&[2, 3, 19, 8]),
            randn(&[2, 3, 19, 8]),
        );
        let expect = crate::attention::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.3)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((2, 5, 24))
            .unwrap();
        let got = attention_merged(&q, &k, &v, Some(&mask), 0.3).unwrap();
        assert!(rel(&got, &expect) < 1e-6);

        let split = attention_split_heads(&q, &k, &v, Some(&mask), 0.3)
            .unwrap()
            .expect("f32 CPU inputs take the kernel");
        let expect = crate::attention::scaled_dot_product_attention(
            &q.to_dtype(DType::F64).unwrap(),
            &k.to_dtype(DType::F64).unwrap(),
            &v.to_dtype(DType::F64).unwrap(),
            Some(&mask.to_dtype(DType::F64).unwrap()),
            0.3,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
        assert!(rel(&split, &expect) < 1e-6);
        assert!(
            attention_split_heads(&q.to_dtype(DType::F64).unwrap(), &k, &v, None, 0.3)
                .unwrap()
                .is_none()
        );

        let qkv = randn(&[2, 7, 3 * 4 * 5]);
        let b = randn(&[60]);
        let parts = split_heads(&qkv, Some(&b), 3, 4).unwrap();
        let full = qkv.broadcast_add(&b).unwrap();
        for (p, t) in parts.iter().enumerate() {
            let expect = full
                .narrow(2, p * 20, 20)
                .unwrap()
                .reshape((2, 7, 4, 5))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            assert_eq!(rel(t, &expect), 0.0);
        }
    }
}
