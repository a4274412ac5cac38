//! `flux-forward`: one Flux.1-dev transformer forward at full Flux width (hidden 3072 = 24 heads
//! × 128) with random weights and fewer blocks, timed as `sd3-forward` times SD3's
//! (`scripts/bench_pytorch.py flux-forward` does the same work in diffusers).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use xfuser_core::backbone::{names, Conditioning};
use xfuser_transformers::transformer_flux::{Config, FluxTransformer2DModel};

use crate::{median, randn, report, time_forwards, total_flops, Gemm, RandomWeights, Runs};

/// Flux.1-dev's transformer, but for the flags' depth and shapes (identical to
/// scripts/bench_pytorch.py's `flux-forward`).
#[derive(Args)]
pub struct FluxForwardArgs {
    /// Image side in pixels (the latent is resolution/8, packed into 2×2 tokens).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Batch of the transformer (Flux-dev embeds the guidance: no CFG batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Double-stream blocks (Flux.1: 19; all of them do not fit in f32 on 24 GiB).
    #[arg(long, default_value_t = 2)]
    double_layers: usize,
    /// Single-stream blocks (Flux.1: 38).
    #[arg(long, default_value_t = 4)]
    single_layers: usize,
    /// T5 text tokens (Flux.1-dev: 512).
    #[arg(long, default_value_t = 512)]
    text_len: usize,
    /// The guidance value embedded by the model (FluxPipeline's guidance_scale).
    #[arg(long, default_value_t = 3.5)]
    guidance: f32,
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

/// Flux.1-dev (`black-forest-labs/FLUX.1-dev`) with the flags' block counts.
fn config(a: &FluxForwardArgs) -> Result<Config> {
    Ok(serde_json::from_value(serde_json::json!({
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": a.double_layers,
        "num_single_layers": a.single_layers,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": true,
        "axes_dims_rope": [16, 56, 56],
    }))?)
}

/// Every matrix product of a Flux forward (the Linear layers stack the batch into rows; the
/// attention of every block has all N + L queries).
fn forward_gemms(cfg: &Config, a: &FluxForwardArgs) -> Vec<Gemm> {
    let (b, l) = (a.batch, a.text_len);
    let (dl, sl) = (a.double_layers, a.single_layers);
    let (heads, dh) = (cfg.num_attention_heads, cfg.attention_head_dim);
    let d = heads * dh;
    let mlp = 4 * d;
    let lat = a.resolution / 8;
    let n = (lat / 2) * (lat / 2);
    let s = n + l;
    let out = cfg.out_channels();
    let g = |what, count, batch, m, k, n| Gemm {
        what,
        count,
        batch,
        m,
        k,
        n,
    };
    vec![
        // Double-stream blocks.
        g("double image q,k,v,out N·D·D", 4 * dl, 1, b * n, d, d),
        g("double text q,k,v,out L·D·D", 4 * dl, 1, b * l, d, d),
        g("double attn q·kᵀ", dl, b * heads, s, dh, s),
        g("double attn p·v", dl, b * heads, s, s, dh),
        g("double image ff up N·D·4D", dl, 1, b * n, d, 4 * d),
        g("double image ff down N·4D·D", dl, 1, b * n, 4 * d, d),
        g("double text ff up L·D·4D", dl, 1, b * l, d, 4 * d),
        g("double text ff down L·4D·D", dl, 1, b * l, 4 * d, d),
        g("double adaLN norm1 D·6D", dl, 1, b, d, 6 * d),
        g("double adaLN norm1_context D·6D", dl, 1, b, d, 6 * d),
        // Single-stream blocks (over the N + L tokens).
        g("single q,k,v S·D·3D", sl, 1, b * s, d, 3 * d),
        g("single proj_mlp S·D·4D", sl, 1, b * s, d, mlp),
        g("single attn q·kᵀ", sl, b * heads, s, dh, s),
        g("single attn p·v", sl, b * heads, s, s, dh),
        g("single proj_out S·5D·D", sl, 1, b * s, d + mlp, d),
        g("single adaLN norm D·3D", sl, 1, b, d, 3 * d),
        // Embedders and the final layer.
        g("x_embedder", 1, 1, b * n, cfg.in_channels, d),
        g("context_embedder", 1, 1, b * l, cfg.joint_attention_dim, d),
        g("timestep mlp", 1, 1, b, 256, d),
        g("timestep mlp 2", 1, 1, b, d, d),
        g("guidance mlp", 1, 1, b, 256, d),
        g("guidance mlp 2", 1, 1, b, d, d),
        g("pooled text mlp", 1, 1, b, cfg.pooled_projection_dim, d),
        g("pooled text mlp 2", 1, 1, b, d, d),
        g("norm_out D·2D", 1, 1, b, d, 2 * d),
        g("proj_out", 1, 1, b * n, d, out),
    ]
}

pub fn flux_forward(a: &FluxForwardArgs) -> Result<()> {
    let cfg = config(a)?;
    let t0 = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    let model = FluxTransformer2DModel::new(&cfg, vb).context("building the Flux transformer")?;
    let flops = total_flops(&forward_gemms(&cfg, a));
    eprintln!(
        "model built in {:.1}s: {} double + {} single blocks, hidden {}, {} text tokens, \
         {:.1} GFLOP per forward, threads {}",
        t0.elapsed().as_secs_f64(),
        a.double_layers,
        a.single_layers,
        cfg.num_attention_heads * cfg.attention_head_dim,
        a.text_len,
        flops / 1e9,
        candle_core::utils::get_num_threads()
    );
    // Unpacked latents: the model packs 2×2 latent pixels into a token itself.
    let lat = a.resolution / 8;
    let latent = randn(&[a.batch, cfg.in_channels / 4, lat, lat], 1)?;
    let text = randn(&[a.batch, a.text_len, cfg.joint_attention_dim], 2)?;
    let pooled = randn(&[a.batch, cfg.pooled_projection_dim], 3)?;
    // The scheduler's scale (0..1000); the model divides by 1000 as FluxPipeline does.
    let timestep = Tensor::full(999f32, a.batch, &Device::Cpu)?;
    let guidance = Tensor::full(a.guidance, a.batch, &Device::Cpu)?;
    // A new text tensor for every forward unless --reuse-text (the model caches the
    // context_embedder output per text tensor; torch recomputes it in every forward).
    let mut conditioning = || -> Result<Conditioning> {
        let text = if a.reuse_text {
            text.clone()
        } else {
            text.copy()?
        };
        Ok(Conditioning::new()
            .with(names::ENCODER_HIDDEN_STATES, text)
            .with(names::POOLED_PROJECTIONS, pooled.clone())
            .with(names::GUIDANCE, guidance.clone()))
    };
    let runs = Runs {
        warmup: a.warmup,
        iters: a.iters,
        parts: a.parts,
    };
    let times = time_forwards(&model, &latent, &timestep, &runs, &mut conditioning)?;
    eprintln!("peak RSS {} kB", crate::peak_rss_kib()?);
    report(median(times), flops);
    Ok(())
}
