//! The contract between a diffusion-transformer backbone and the runtime that parallelizes it:
//! a forward pass in three parts, `embed` (patchify + conditioning; first pipeline stage),
//! `blocks(range)` (the transformer blocks a stage owns) and `head` (final norm + unpatchify;
//! last stage). The runtime can thus run any registered backbone stage by stage and patch by
//! patch without knowing its insides.

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;

use crate::attention::AttentionProcessor;
use crate::Result;

/// Inputs of one denoising forward, named as in diffusers.
#[derive(Debug, Clone, Copy)]
pub struct BackboneInputs<'a> {
    /// (B, C, H, W) noisy latents.
    pub hidden_states: &'a Tensor,
    /// (B, L, caption_channels) text-encoder output.
    pub encoder_hidden_states: &'a Tensor,
    /// (B,) diffusion timesteps.
    pub timestep: &'a Tensor,
    /// (B, L), 1 where a text token is attended to, 0 where it is padding.
    pub encoder_attention_mask: Option<&'a Tensor>,
    /// PixArt-α micro-conditioning: (B, 2) image resolution (height, width).
    pub resolution: Option<&'a Tensor>,
    /// PixArt-α micro-conditioning: (B, 1) aspect ratio.
    pub aspect_ratio: Option<&'a Tensor>,
}

/// The activations that flow between `embed`, the blocks and `head`.
#[derive(Debug, Clone)]
pub struct BlockState {
    /// (B, N, D) image tokens.
    pub hidden: Tensor,
    /// (B, L, D) text tokens after the caption projection.
    pub encoder: Tensor,
    /// Additive bias on the text keys, broadcastable to (B, H, N, L); None when nothing is masked.
    pub encoder_bias: Option<Tensor>,
    /// Per-sample conditioning each block reads (PixArt: adaLN-single's (B, 6·D)).
    pub block_conditioning: Tensor,
    /// Per-sample conditioning the head reads (PixArt: the embedded timestep, (B, D)).
    pub head_conditioning: Tensor,
    /// The latent token grid (rows, columns) in patches, for unpatchify.
    pub grid: (usize, usize),
}

/// Static facts about a backbone that the runtime validates parallel configurations against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackboneInfo {
    pub class_name: &'static str,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: usize,
    /// Latent side length the model was trained at (diffusers' `sample_size`).
    pub sample_size: usize,
    pub caption_channels: usize,
}

/// How a forward is run: which attention processor does self-attention. The default is serial.
#[derive(Clone, Default)]
pub struct ForwardContext {
    pub attention: Option<Arc<dyn AttentionProcessor>>,
}

pub trait Backbone: Send + Sync {
    fn info(&self) -> &BackboneInfo;

    /// Patch embedding, positional embedding and conditioning of the whole input.
    fn embed(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<BlockState>;

    /// Runs the transformer blocks `layers` (indices into 0..num_layers) on `state`.
    fn blocks(
        &self,
        state: BlockState,
        layers: Range<usize>,
        ctx: &ForwardContext,
    ) -> Result<BlockState>;

    /// Final norm, projection and unpatchify: (B, N, D) -> (B, out_channels, H, W).
    fn head(&self, state: BlockState, ctx: &ForwardContext) -> Result<Tensor>;

    /// The whole forward, as diffusers' `model(...)`.
    fn forward(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<Tensor> {
        let state = self.embed(inputs, ctx)?;
        let state = self.blocks(state, 0..self.info().num_layers, ctx)?;
        self.head(state, ctx)
    }
}
