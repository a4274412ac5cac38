//! `sd3-forward`: one SD3 transformer (MMDiT) forward at SD3-medium width with random weights,
//! timed as `pixart-forward` times PixArt's (`scripts/bench_pytorch.py sd3-forward` does the
//! same work in diffusers).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use xfuser_core::backbone::{names, Conditioning};
use xfuser_transformers::transformer_sd3::{Config, SD3Transformer2DModel};

use crate::{median, randn, report, time_forwards, total_flops, Gemm, RandomWeights, Runs};

/// SD3-medium's transformer, but for the flags' depth and shapes (identical to
/// scripts/bench_pytorch.py's `sd3-forward`).
#[derive(Args)]
pub struct Sd3ForwardArgs {
    /// Image side in pixels (the latent is resolution/8, patches of 2×2).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Batch of the transformer (2 = one image with classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Joint blocks (SD3-medium: 24).
    #[arg(long, default_value_t = 24)]
    layers: usize,
    /// Text tokens (SD3: 77 CLIP + 256 T5).
    #[arg(long, default_value_t = 333)]
    text_len: usize,
    /// The config's sample_size (SD3-medium: 128; it sets the position table's base size).
    #[arg(long, default_value_t = 128)]
    sample_size: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Print the time of each part of the forward (embed, per-block, head) too.
    #[arg(long)]
    parts: bool,
    /// Pass the same text tensor to every forward, so that its context_embedder projection
    /// comes from the model's cache after the first; by default each forward gets a new
    /// tensor and computes it, as torch does.
    #[arg(long)]
    reuse_text: bool,
}

/// SD3-medium (`stabilityai/stable-diffusion-3-medium-diffusers`) with `layers` blocks.
fn config(a: &Sd3ForwardArgs) -> Result<Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "sample_size": a.sample_size,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": a.layers,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
    }))?)
}

/// Every matrix product of an SD3 forward (the Linear layers stack the batch into rows). The
/// last block is `context_pre_only`: no text output projection or text feed-forward, a
/// 2·D text modulation, and only the image queries attend (diffusers also computes the text
/// queries' attention there and drops it; that is not counted).
fn forward_gemms(cfg: &Config, a: &Sd3ForwardArgs) -> Vec<Gemm> {
    let (b, layers, l) = (a.batch, a.layers, a.text_len);
    let d = cfg.inner_dim();
    let p = cfg.patch_size;
    let lat = a.resolution / 8;
    let n = (lat / p) * (lat / p);
    let (heads, dh) = (cfg.num_attention_heads, cfg.attention_head_dim);
    let last = layers.min(1);
    let joint = layers - last;
    let g = |what, count, batch, m, k, n| Gemm {
        what,
        count,
        batch,
        m,
        k,
        n,
    };
    vec![
        g("image q,k,v,out N·D·D", 4 * layers, 1, b * n, d, d),
        g("text q,k,v L·D·D", 3 * layers, 1, b * l, d, d),
        g("text out L·D·D", joint, 1, b * l, d, d),
        g(
            "attn q·kᵀ (N+L queries)",
            joint,
            b * heads,
            n + l,
            dh,
            n + l,
        ),
        g("attn p·v (N+L queries)", joint, b * heads, n + l, n + l, dh),
        g("attn q·kᵀ last (N queries)", last, b * heads, n, dh, n + l),
        g("attn p·v last (N queries)", last, b * heads, n, n + l, dh),
        g("image ff up N·D·4D", layers, 1, b * n, d, 4 * d),
        g("image ff down N·4D·D", layers, 1, b * n, 4 * d, d),
        g("text ff up L·D·4D", joint, 1, b * l, d, 4 * d),
        g("text ff down L·4D·D", joint, 1, b * l, 4 * d, d),
        g("adaLN norm1 D·6D", layers, 1, b, d, 6 * d),
        g("adaLN norm1_context D·6D", joint, 1, b, d, 6 * d),
        g("adaLN norm1_context last D·2D", last, 1, b, d, 2 * d),
        g(
            "context_embedder",
            1,
            1,
            b * l,
            cfg.joint_attention_dim,
            cfg.caption_projection_dim,
        ),
        g("patch embed", 1, 1, b * n, cfg.in_channels * p * p, d),
        g("timestep mlp", 1, 1, b, 256, d),
        g("timestep mlp 2", 1, 1, b, d, d),
        g("pooled text mlp", 1, 1, b, cfg.pooled_projection_dim, d),
        g("pooled text mlp 2", 1, 1, b, d, d),
        g("norm_out D·2D", 1, 1, b, d, 2 * d),
        g("proj_out", 1, 1, b * n, d, p * p * cfg.out_channels()),
    ]
}

pub fn sd3_forward(a: &Sd3ForwardArgs) -> Result<()> {
    let cfg = config(a)?;
    let t0 = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    let model = SD3Transformer2DModel::new(&cfg, vb).context("building the SD3 transformer")?;
    let flops = total_flops(&forward_gemms(&cfg, a));
    eprintln!(
        "model built in {:.1}s: {} layers, hidden {}, {} text tokens, {:.1} GFLOP per forward, \
         threads {}",
        t0.elapsed().as_secs_f64(),
        a.layers,
        cfg.inner_dim(),
        a.text_len,
        flops / 1e9,
        candle_core::utils::get_num_threads()
    );
    let lat = a.resolution / 8;
    let latent = randn(&[a.batch, cfg.in_channels, lat, lat], 1)?;
    let text = randn(&[a.batch, a.text_len, cfg.joint_attention_dim], 2)?;
    let pooled = randn(&[a.batch, cfg.pooled_projection_dim], 3)?;
    let timestep = Tensor::full(999f32, a.batch, &Device::Cpu)?;
    // A new text tensor for every forward unless --reuse-text: the model caches the
    // context_embedder output per text tensor (a denoising loop reuses it), and torch
    // recomputes it in every forward.
    let mut conditioning = || -> Result<Conditioning> {
        let text = if a.reuse_text {
            text.clone()
        } else {
            text.copy()?
        };
        Ok(Conditioning::new()
            .with(names::ENCODER_HIDDEN_STATES, text)
            .with(names::POOLED_PROJECTIONS, pooled.clone()))
    };
    let runs = Runs {
        warmup: a.warmup,
        iters: a.iters,
        parts: a.parts,
    };
    let times = time_forwards(&model, &latent, &timestep, &runs, &mut conditioning)?;
    report(median(times), flops);
    Ok(())
}
