//! PipeFusion's self-attention with stale K/V, after xDiT's PipeFusion
//! (<https://arxiv.org/abs/2405.14430>): the image is denoised patch by patch, and a patch's
//! queries attend to the keys and values of the whole image, where only the patch's own rows
//! are fresh. The other rows come from a per-layer buffer that holds the last K/V computed for
//! each row: the previous step's, or this step's for the patches already done.
//!
//! One [`PipeFusionAttention`] per patch (and one for the whole image, which the synchronous
//! warmup steps use) share a [`KvBuffers`]. Every call writes the fresh K/V of its rows into
//! the layer's buffer and attends over the whole buffer. The whole-image call writes every
//! row, so a step run on the whole image is exact, and it must come first: it allocates the
//! buffers (the pipeline's warmup steps).
//!
//! Hybrid with sequence parallelism (a patch split over the sp ranks): the buffer is filled
//! after the exchange. Under Ulysses, q, k, v go through the all-to-all to "all the patch's
//! tokens, my heads", the patch's real K/V rows are written into the (B, H/U, N, Dh) buffer and
//! the queries attend over it, then the all-to-all back. Under Ring (and across the ring
//! group of USP), the patch's k, v slices are all-gathered over the ring group instead of
//! passed around, so each rank holds the patch's whole K/V to write; queries stay local.
//!
//! For tests, [`PipeFusionAttention::with_zeroed_stale`] replaces the stale rows by zeros: what
//! a pipeline that lost its buffers would compute, a baseline the stale-KV approximation must
//! beat.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use xfuser_core::attention::{scaled_dot_product_attention, AttentionProcessor, JointText};
use xfuser_core::backbone::SpContext;
use xfuser_core::distributed::{ProcessGroup, TokenRange};
use xfuser_core::registry::AttentionProcessorEntry;
use xfuser_core::{Error, Result};

use crate::attention_processor::{
    own_heads, scatter_heads_gather_sequence, scatter_sequence_gather_heads,
};

/// Per layer, the (K, V) of every image token, (B, H/U, N, Dh), as last computed.
#[derive(Debug)]
pub struct KvBuffers {
    /// Real tokens of the whole image.
    num_tokens: usize,
    layers: Mutex<BTreeMap<usize, (Tensor, Tensor)>>,
}

impl KvBuffers {
    fn new(num_tokens: usize) -> Self {
        Self {
            num_tokens,
            layers: Mutex::new(BTreeMap::new()),
        }
    }

    /// Bytes the buffers hold (K and V of every layer written so far).
    pub fn bytes(&self) -> usize {
        let layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers
            .values()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// `buffer` with the rows `start..start + fresh.len` (dim 2) replaced by `fresh`.
fn replace_rows(buffer: &Tensor, start: usize, fresh: &Tensor) -> Result<Tensor> {
    let total = buffer.dim(2)?;
    let end = start + fresh.dim(2)?;
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        parts.push(buffer.narrow(2, 0, start)?);
    }
    parts.push(fresh.clone());
    if end < total {
        parts.push(buffer.narrow(2, end, total - end)?);
    }
    Ok(Tensor::cat(&parts, 2)?)
}

/// Zeros of `like`'s shape with the rows `start..` (dim 2) set to `fresh`.
fn zeros_but(like: &Tensor, start: usize, fresh: &Tensor) -> Result<Tensor> {
    replace_rows(&like.zeros_like()?, start, fresh)
}

/// Self-attention of one patch (or of the whole image) over the stale-K/V buffers.
#[derive(Debug, Clone)]
pub struct PipeFusionAttention {
    buffers: Arc<KvBuffers>,
    ulysses: ProcessGroup,
    ring: ProcessGroup,
    /// Tokens each sp rank holds for this patch, padding included.
    per_rank: usize,
    /// The patch's real tokens in the image.
    tokens: TokenRange,
    zero_stale: bool,
}

impl PipeFusionAttention {
    /// The processor of the whole image for `sp`, whose split must be of the whole image
    /// (`InputMetadata::full`): it sizes the buffers. Patches get theirs from
    /// [`for_patch`](Self::for_patch).
    pub fn new(sp: &SpContext) -> Result<Self> {
        let tokens = sp.patch().tokens;
        if tokens.start != 0 {
            return Err(Error::invalid(format!(
                "the PipeFusion attention processor is built for the whole image, but the split \
                 given starts at token {}: build it from InputMetadata::full",
                tokens.start
            )));
        }
        Ok(Self {
            buffers: Arc::new(KvBuffers::new(tokens.len)),
            ulysses: sp.ulysses_group().clone(),
            ring: sp.ring_group().clone(),
            per_rank: sp.padded_len(),
            tokens,
            zero_stale: false,
        })
    }

    /// The processor of the patch `sp` splits, sharing this one's buffers.
    pub fn for_patch(&self, sp: &SpContext) -> Result<Self> {
        let tokens = sp.patch().tokens;
        if tokens.end() > self.buffers.num_tokens {
            return Err(Error::invalid(format!(
                "PipeFusion patch tokens {:?} exceed the image's {} tokens",
                tokens.range(),
                self.buffers.num_tokens
            )));
        }
        Ok(Self {
            buffers: self.buffers.clone(),
            ulysses: sp.ulysses_group().clone(),
            ring: sp.ring_group().clone(),
            per_rank: sp.padded_len(),
            tokens,
            zero_stale: self.zero_stale,
        })
    }

    /// Test aid: a patch attends to zeros instead of the stale rows of the other patches
    /// (patches made after this call inherit it).
    pub fn with_zeroed_stale(mut self, zero_stale: bool) -> Self {
        self.zero_stale = zero_stale;
        self
    }

    /// The buffers shared by this processor and its patches'.
    pub fn buffers(&self) -> &Arc<KvBuffers> {
        &self.buffers
    }

    fn is_whole_image(&self) -> bool {
        self.tokens.start == 0 && self.tokens.len == self.buffers.num_tokens
    }

    /// Writes this patch's fresh rows of `layer` and returns the keys and values to attend to.
    fn update_buffers(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        // The gathered sequence is the patch's real tokens, then padding.
        let (k, v) = (
            k.narrow(2, 0, self.tokens.len)?,
            v.narrow(2, 0, self.tokens.len)?,
        );
        let mut layers = self
            .buffers
            .layers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.is_whole_image() {
            layers.insert(layer, (k.clone(), v.clone()));
            return Ok((k, v));
        }
        let (k_buf, v_buf) = layers.get(&layer).ok_or_else(|| {
            Error::invalid(format!(
                "PipeFusion: layer {layer} has no K/V buffer yet for patch tokens {:?}: the \
                 first step must run on the whole image (--warmup-steps ≥ 1)",
                self.tokens.range()
            ))
        })?;
        if k_buf.dims()[..2] != k.dims()[..2] || k_buf.dims()[3] != k.dims()[3] {
            return Err(Error::invalid(format!(
                "PipeFusion: layer {layer}'s K/V buffer is {:?} but the patch's keys are {:?}",
                k_buf.dims(),
                k.dims()
            )));
        }
        let k_new = replace_rows(k_buf, self.tokens.start, &k)?;
        let v_new = replace_rows(v_buf, self.tokens.start, &v)?;
        let used = if self.zero_stale {
            (
                zeros_but(&k_new, self.tokens.start, &k)?,
                zeros_but(&v_new, self.tokens.start, &v)?,
            )
        } else {
            (k_new.clone(), v_new.clone())
        };
        layers.insert(layer, (k_new, v_new));
        Ok(used)
    }
}

impl AttentionProcessor for PipeFusionAttention {
    fn name(&self) -> &'static str {
        "pipefusion"
    }

    /// q, k, v: (B, H, P, Dh), this sp rank's tokens of the patch -> (B, H, P, Dh).
    fn self_attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        Ok(self.attend(layer, q, k, v, None, scale)?.0)
    }

    /// The patch's image queries and the text's attend to the image's K/V buffer (the
    /// patch's rows fresh) and the text's fresh keys and values. Under Ulysses each rank takes
    /// its heads of the text and the text output's heads are all-gathered.
    fn joint_attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        text: JointText<'_>,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (out, text_out) = self.attend(layer, q, k, v, Some(text), scale)?;
        let text_out = text_out.ok_or_else(|| Error::invalid("joint attention lost its text"))?;
        Ok((out, text_out))
    }
}

impl PipeFusionAttention {
    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        text: Option<JointText<'_>>,
        scale: f64,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if q.dim(2)? != self.per_rank {
            return Err(Error::invalid(format!(
                "pipefusion attention: q {:?} holds {} tokens, but the patch split gives every \
                 rank {}; build the processor for this patch",
                q.dims(),
                q.dim(2)?,
                self.per_rank
            )));
        }
        let use_ulysses = self.ulysses.size() > 1;
        // (B, H, P, Dh) -> (B, H/U, U·P, Dh)
        let (q, k, v) = if use_ulysses {
            (
                scatter_heads_gather_sequence(&self.ulysses, q)?,
                scatter_heads_gather_sequence(&self.ulysses, k)?,
                scatter_heads_gather_sequence(&self.ulysses, v)?,
            )
        } else {
            (q.clone(), k.clone(), v.clone())
        };
        // (B, H/U, U·P, Dh) -> (B, H/U, R·U·P, Dh): the patch's whole padded sequence.
        let (k, v) = if self.ring.size() > 1 {
            (
                self.ring.all_gather(&k.contiguous()?, 2)?,
                self.ring.all_gather(&v.contiguous()?, 2)?,
            )
        } else {
            (k, v)
        };
        let (keys, values) = self.update_buffers(layer, &k, &v)?;
        let Some(text) = text else {
            let out = scaled_dot_product_attention(&q, &keys, &values, None, scale)?;
            return Ok((self.back_to_local(&out)?, None));
        };
        let heads = |t: &Tensor| -> Result<Tensor> {
            if use_ulysses {
                own_heads(&self.ulysses, t)
            } else {
                Ok(t.clone())
            }
        };
        let (tq, tk, tv) = (heads(text.q)?, heads(text.k)?, heads(text.v)?);
        let image_queries = q.dim(2)?;
        let out = scaled_dot_product_attention(
            &Tensor::cat(&[&q, &tq], 2)?,
            &Tensor::cat(&[&keys, &tk], 2)?,
            &Tensor::cat(&[&values, &tv], 2)?,
            None,
            scale,
        )?;
        let image = out.narrow(2, 0, image_queries)?.contiguous()?;
        let text_out = out.narrow(2, image_queries, tq.dim(2)?)?.contiguous()?;
        let text_out = if use_ulysses {
            self.ulysses.all_gather(&text_out, 1)?
        } else {
            text_out
        };
        Ok((self.back_to_local(&image)?, Some(text_out)))
    }

    /// (B, H/U, U·P, Dh) -> (B, H, P, Dh) under Ulysses; unchanged otherwise.
    fn back_to_local(&self, out: &Tensor) -> Result<Tensor> {
        if self.ulysses.size() > 1 {
            scatter_sequence_gather_heads(&self.ulysses, out)
        } else {
            Ok(out.clone())
        }
    }
}

fn build_pipefusion(sp: &SpContext) -> Result<Arc<dyn AttentionProcessor>> {
    Ok(Arc::new(PipeFusionAttention::new(sp)?))
}

xfuser_core::inventory::submit! {
    AttentionProcessorEntry {
        name: "pipefusion",
        description: "PipeFusion: a patch attends to a per-layer K/V buffer of the whole image, \
                      its own rows fresh, the others stale (Ulysses/Ring inside)",
        build: build_pipefusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use xfuser_core::distributed::{
        launch_local, runtime_state::input_metadata, LaunchOptions, RankMesh, ShapeParams,
    };
    use xfuser_core::engine::ParallelConfig;
    use xfuser_core::testing::rel_l2;

    fn rand(n: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (2, 2, n, 4), &Device::Cpu).unwrap()
    }

    fn rows(t: &Tensor, r: std::ops::Range<usize>) -> Tensor {
        t.narrow(2, r.start, r.len()).unwrap()
    }

    /// 4 token rows of 3 tokens in 2 patches of 6 tokens, one rank.
    #[test]
    fn patches_attend_to_fresh_rows_and_stale_others() {
        let mesh = RankMesh::new(&ParallelConfig::default()).unwrap();
        let params = ShapeParams {
            sp_degree: 1,
            num_pipeline_patch: 2,
            patch_size: 1,
            vae_scale_factor: 8,
        };
        let meta = input_metadata(32, 24, 2, 1, &params).unwrap();
        let results = launch_local(&mesh, &LaunchOptions::default(), |ctx| {
            let sp = |p: &xfuser_core::distributed::Patch| SpContext::from_rank(&ctx, p.clone());
            let whole = PipeFusionAttention::new(&sp(&meta.full)?)?;
            let patches = meta
                .patches
                .iter()
                .map(|p| whole.for_patch(&sp(p)?))
                .collect::<Result<Vec<_>>>()?;
            let zeroed = whole
                .clone()
                .with_zeroed_stale(true)
                .for_patch(&sp(&meta.patches[0])?)?;
            let (q, k, v) = (rand(12), rand(12), rand(12));
            let first = whole.self_attention(3, &q, &k, &v, 0.5)?;
            let want = scaled_dot_product_attention(&q, &k, &v, None, 0.5)?;
            assert!(rel_l2(&first, &want)? < 1e-6);

            // The next step: patch 0 sees its fresh rows and patch 1's stale ones; patch 1
            // then sees everything fresh.
            let (q2, k2, v2) = (rand(12), rand(12), rand(12));
            let out0 = patches[0].self_attention(
                3,
                &rows(&q2, 0..6),
                &rows(&k2, 0..6),
                &rows(&v2, 0..6),
                0.5,
            )?;
            let mixed_k = Tensor::cat(&[rows(&k2, 0..6), rows(&k, 6..12)], 2)?;
            let mixed_v = Tensor::cat(&[rows(&v2, 0..6), rows(&v, 6..12)], 2)?;
            let want0 =
                scaled_dot_product_attention(&rows(&q2, 0..6), &mixed_k, &mixed_v, None, 0.5)?;
            assert!(rel_l2(&out0, &want0)? < 1e-6);
            let out1 = patches[1].self_attention(
                3,
                &rows(&q2, 6..12),
                &rows(&k2, 6..12),
                &rows(&v2, 6..12),
                0.5,
            )?;
            let want1 = scaled_dot_product_attention(&rows(&q2, 6..12), &k2, &v2, None, 0.5)?;
            assert!(rel_l2(&out1, &want1)? < 1e-6);

            let out_zero = zeroed.self_attention(
                3,
                &rows(&q2, 0..6),
                &rows(&k2, 0..6),
                &rows(&v2, 0..6),
                0.5,
            )?;
            let zeros = rows(&k2, 6..12).zeros_like()?;
            let zk = Tensor::cat(&[rows(&k2, 0..6), zeros.clone()], 2)?;
            let zv = Tensor::cat(&[rows(&v2, 0..6), zeros], 2)?;
            let want_zero = scaled_dot_product_attention(&rows(&q2, 0..6), &zk, &zv, None, 0.5)?;
            assert!(rel_l2(&out_zero, &want_zero)? < 1e-6);

            // A patch before any whole-image step has nothing to attend to.
            let err = patches[0]
                .self_attention(7, &rows(&q2, 0..6), &rows(&k2, 0..6), &rows(&v2, 0..6), 0.5)
                .unwrap_err()
                .to_string();
            assert!(err.contains("--warmup-steps"), "{err}");
            Ok(whole.buffers().bytes())
        })
        .unwrap();
        assert_eq!(results[0], 2 * 2 * 2 * 12 * 4 * 4);
    }

    /// Under Ulysses and Ring (with padding: 5 token rows over 2 or 4 ranks), the whole-image
    /// call equals serial attention, and a patch's call equals attention over its fresh rows
    /// and the others' stale ones.
    #[test]
    fn sequence_parallel_patches_match_the_serial_buffer() {
        for (u, r) in [(2, 1), (1, 2), (2, 2)] {
            let mesh = RankMesh::new(&ParallelConfig {
                ulysses_degree: u,
                ring_degree: r,
                ..Default::default()
            })
            .unwrap();
            let params = ShapeParams {
                sp_degree: u * r,
                num_pipeline_patch: 2,
                patch_size: 1,
                vae_scale_factor: 8,
            };
            let n = 18;
            let meta = input_metadata(72, 16, 2, 1, &params).unwrap();
            let (q, k, v) = (rand(n), rand(n), rand(n));
            let (q2, k2, v2) = (rand(n), rand(n), rand(n));
            let p0 = meta.patches[0].tokens;
            let serial_whole = scaled_dot_product_attention(&q, &k, &v, None, 0.5).unwrap();
            let mixed = |new: &Tensor, old: &Tensor| {
                Tensor::cat(&[rows(new, 0..p0.len), rows(old, p0.len..n)], 2).unwrap()
            };
            let serial_p0 =
                scaled_dot_product_attention(&q2, &mixed(&k2, &k), &mixed(&v2, &v), None, 0.5)
                    .unwrap();
            let outs = launch_local(&mesh, &LaunchOptions::default(), |ctx| {
                let sp_full = SpContext::from_rank(&ctx, meta.full.clone())?;
                let sp_p0 = SpContext::from_rank(&ctx, meta.patches[0].clone())?;
                let local = |t: &Tensor, sp: &SpContext| -> Result<Tensor> {
                    let s = sp.slice();
                    let t = rows(t, s.tokens.range());
                    Ok(t.pad_with_zeros(2, 0, s.padding())?)
                };
                let whole = PipeFusionAttention::new(&sp_full)?;
                let patch = whole.for_patch(&sp_p0)?;
                let a = whole.self_attention(
                    0,
                    &local(&q, &sp_full)?,
                    &local(&k, &sp_full)?,
                    &local(&v, &sp_full)?,
                    0.5,
                )?;
                let b = patch.self_attention(
                    0,
                    &local(&q2, &sp_p0)?,
                    &local(&k2, &sp_p0)?,
                    &local(&v2, &sp_p0)?,
                    0.5,
                )?;
                Ok((sp_full.slice().clone(), a, sp_p0.slice().clone(), b))
            })
            .unwrap();
            for (s_full, a, s_p0, b) in outs {
                if s_full.tokens.len > 0 {
                    let want = rows(&serial_whole, s_full.tokens.range());
                    let got = rows(&a, 0..s_full.tokens.len);
                    assert!(rel_l2(&got, &want).unwrap() < 1e-5, "u{u} r{r} whole");
                }
                if s_p0.tokens.len > 0 {
                    let want = rows(&serial_p0, s_p0.tokens.range());
                    let got = rows(&b, 0..s_p0.tokens.len);
                    assert!(rel_l2(&got, &want).unwrap() < 1e-5, "u{u} r{r} patch");
                }
            }
        }
    }
}
