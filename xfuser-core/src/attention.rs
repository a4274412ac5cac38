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
