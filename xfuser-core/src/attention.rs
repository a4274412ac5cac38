//! Attention math shared by every model, and the interface of the self-attention processors
//! that parallel methods (Ulysses, Ring, PipeFusion) substitute for the serial one.

use candle_core::{DType, Tensor};

use crate::Result;

/// Self-attention over image tokens as a parallel method computes it.
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
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let probs = if dtype == DType::F32 {
        // scale, bias and softmax in one pass
        crate::kernels::scaled_masked_softmax(&scores, scale, bias)?
    } else {
        let scores = (scores * scale)?.to_dtype(DType::F32)?;
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
}
