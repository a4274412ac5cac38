//! Attention math shared by every model, and the interface of the attention processors that
//! parallel methods (Ulysses, Ring, PipeFusion) substitute for the serial one.
//!
//! A processor sees the attention over the image tokens, which is what parallel methods
//! split: plain self-attention (PixArt), or joint attention, where the image tokens and the
//! text tokens attend to each other in one softmax (SD3, Flux). The text tokens are whole on
//! every sequence-parallel rank; how a processor handles them is its choice (xDiT's: Ulysses
//! gives each rank its heads of the text too, Ring joins the text keys once).

use candle_core::{DType, Tensor};

use crate::Result;

/// The text side of a joint attention: (B, H, L, Dh) queries, keys and values of the whole
/// text, the same on every sequence-parallel rank.
#[derive(Debug, Clone, Copy)]
pub struct JointText<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
}

/// Attention over image tokens as a parallel method computes it.
///
/// `layer` names the attention site whose state a processor may keep between calls
/// (PipeFusion keeps each site's stale K/V): the block index, and for a block's second
/// self-attention (SD3.5's dual attention) `num_layers + block`.
pub trait AttentionProcessor: Send + Sync {
    fn name(&self) -> &'static str;

    /// q, k, v: (B, H, S_local, Dh) -> (B, H, S_local, Dh) for transformer block `layer`.
    fn self_attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor>;

    /// Joint attention: the queries of the image tokens (B, H, S_local, Dh) and of the text
    /// attend to the keys of every image token and of the text, in one softmax. Returns the
    /// image output (B, H, S_local, Dh) and the whole text output (B, H, L, Dh), the same on
    /// every rank of a sequence-parallel group. A processor made for self-attention only
    /// refuses it (the default).
    fn joint_attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        text: JointText<'_>,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let _ = (layer, q, k, v, text, scale);
        Err(crate::Error::Unsupported(format!(
            "the `{}` attention processor does only self-attention, and this model needs \
             joint (image + text) attention",
            self.name()
        )))
    }
}

/// Joint attention on one rank over everything it holds: image tokens and text joined into
/// one sequence (image first), attended, split again.
pub fn joint_attention_serial(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    text: JointText<'_>,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let n = q.dim(2)?;
    let l = text.q.dim(2)?;
    let joined = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 2);
    let out = scaled_dot_product_attention(
        &joined(q, text.q)?,
        &joined(k, text.k)?,
        &joined(v, text.v)?,
        None,
        scale,
    )?;
    Ok((out.narrow(2, 0, n)?, out.narrow(2, n, l)?))
}

/// softmax(q·kᵀ·scale + bias)·v. q: (B, H, S, Dh), k and v: (B, H, L, Dh), bias broadcastable
/// to (B, H, S, L). The softmax is computed in f32 whatever the input dtype.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    // f32 on the CPU: one fused task per (batch, head), scores kept in cache.
    if let Some(out) = crate::kernels::attention_split_heads(q, k, v, bias, scale)? {
        return Ok(out);
    }
    let dtype = q.dtype();
    let probs = if dtype == DType::F32 {
        let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
        // scale, bias and softmax in one pass
        crate::kernels::scaled_masked_softmax(&scores, scale, bias)?
    } else {
        // f16/bf16 (the GPU path): q is scaled before the product so that the scores stay
        // in the half-precision range, then the softmax runs in f32 and the probabilities
        // return to the compute dtype for the product with v.
        let scores = (q * scale)?.contiguous()?.matmul(&k.t()?.contiguous()?)?;
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match bias {
            Some(b) => scores.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?
    };
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// The processor used when no parallel method is active.
#[derive(Debug, Default, Clone, Copy)]
pub struct SerialAttention;

impl AttentionProcessor for SerialAttention {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn self_attention(
        &self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        scaled_dot_product_attention(q, k, v, None, scale)
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
        joint_attention_serial(q, k, v, text, scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A fixed (1, 2, n, 8) tensor of values in [-amplitude, amplitude].
    fn wave(n: usize, phase: f32, amplitude: f32) -> Tensor {
        let values: Vec<f32> = (0..2 * n * 8)
            .map(|i| (i as f32 * 0.731 + phase).sin() * amplitude)
            .collect();
        Tensor::from_vec(values, (1, 2, n, 8), &Device::Cpu).unwrap()
    }

    /// q (1, 2, 5, 8), k and v (1, 2, 7, 8) and a key mask, with scores of a few tens (the
    /// softmax is peaked, as in a trained model).
    fn inputs() -> (Tensor, Tensor, Tensor, Tensor) {
        let bias = Tensor::new(&[0f32, 0.0, -1e4, 0.0, 0.0, -1e4, 0.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 7))
            .unwrap();
        (
            wave(5, 0.0, 4.0),
            wave(7, 1.3, 4.0),
            wave(7, 2.9, 1.0),
            bias,
        )
    }

    #[test]
    fn half_precision_attention_returns_its_dtype_and_the_f32_result() {
        let (q, k, v, bias) = inputs();
        let scale = 8f64.powf(-0.5);
        let reference = scaled_dot_product_attention(&q, &k, &v, Some(&bias), scale).unwrap();
        // The rounding of the inputs and of p·v in each dtype: f16 keeps 11 significant bits,
        // bf16 8.
        for (dtype, tolerance) in [(DType::F16, 3e-3), (DType::BF16, 2e-2)] {
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let out =
                scaled_dot_product_attention(&cast(&q), &cast(&k), &cast(&v), Some(&bias), scale)
                    .unwrap();
            assert_eq!(out.dtype(), dtype);
            let err = crate::testing::rel_l2(&out, &reference).unwrap();
            println!("{dtype:?}: rel L2 {err:.3e}");
            assert!(
                err <= tolerance,
                "{dtype:?}: rel L2 {err:.3e} > {tolerance:.0e}"
            );
        }
    }
}
