//! `vae`: the VAE decode of one image with the full-size PixArt VAE (random weights), serial
//! (candle-transformers' decoder) against the patch-parallel decode on `--ranks` rank
//! threads: the time of each, the float error of the parallel image, and the peak activation
//! bytes of each rank (`parallel_vae::peak_activation_bytes`: every rank on a one-thread
//! pool, counted by the tagged global allocator this binary installs).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Args;
use xfuser_core::distributed::{launch_local, LaunchOptions, RankMesh};
use xfuser_core::engine::ParallelConfig;
use xfuser_core::testing::rel_l2;
use xfuser_pipelines::parallel_vae::{peak_activation_bytes, DecodeKind};
use xfuser_pipelines::vae::{AutoencoderKL, VaeConfig};

use crate::RandomWeights;

#[derive(Args)]
pub struct VaeArgs {
    /// Latent side (the image is 8 × this): 128 for 1024 px, 256 for 2048 px.
    #[arg(long, default_value_t = 128)]
    latent: usize,
    /// Rank threads of the parallel decode.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Skip the serial decode (its attention alone needs 2·(latent²)² · 4 bytes).
    #[arg(long)]
    no_serial: bool,
    /// Skip the memory passes (one thread per rank, so slower than the timed runs).
    #[arg(long)]
    no_memory: bool,
}

/// The PixArt-α/Σ VAE (sd-vae-ft-ema): diffusers' `AutoencoderKL` defaults but for these.
fn pixart_vae_config() -> Result<VaeConfig> {
    let config: VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
    }))?;
    config.validate(Path::new("<pixart vae config>"))?;
    Ok(config)
}

pub fn vae(args: &VaeArgs) -> Result<()> {
    if args.ranks < 2 {
        bail!("--ranks must be at least 2");
    }
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    let vae = AutoencoderKL::from_var_builder(
        pixart_vae_config()?,
        vb,
        DType::F32,
        Path::new("<random weights>"),
    )?;
    let z = Tensor::randn(0f32, 1.0, (1, 4, args.latent, args.latent), &Device::Cpu)?;
    let mesh = RankMesh::new(&ParallelConfig {
        ulysses_degree: args.ranks,
        ..Default::default()
    })?;
    let decode_parallel = || -> Result<(f64, Tensor)> {
        let start = Instant::now();
        let mut images = launch_local(&mesh, &LaunchOptions::default(), |ctx| {
            vae.decode_parallel(&z, ctx.world())
        })?;
        let seconds = start.elapsed().as_secs_f64();
        match images.swap_remove(0) {
            Some(image) => Ok((seconds, image)),
            None => bail!("rank 0 returned no image"),
        }
    };
    // Loads the band decoder's weights, outside the timing.
    decode_parallel()?;
    let (parallel_s, parallel_image) = decode_parallel()?;
    println!(
        "image {0}x{0}: parallel decode on {1} ranks {parallel_s:.2} s",
        args.latent * 8,
        args.ranks
    );
    if !args.no_serial {
        let start = Instant::now();
        let serial_image = vae.decode(&z)?;
        let serial_s = start.elapsed().as_secs_f64();
        let err = rel_l2(&parallel_image, &serial_image)?;
        println!(
            "serial decode {serial_s:.2} s; parallel/serial time {:.3}; parallel vs serial rel L2 {err:.3e}",
            parallel_s / serial_s
        );
    }
    drop(parallel_image);
    if !args.no_memory {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        if !args.no_serial {
            let serial = peak_activation_bytes(&vae, &z, DecodeKind::Serial)?[0];
            println!("peak activation MiB, serial (candle): {:.1}", mib(serial));
        }
        let one = peak_activation_bytes(&vae, &z, DecodeKind::Bands(1))?[0];
        println!(
            "peak activation MiB, band decoder on 1 rank: {:.1}",
            mib(one)
        );
        let peaks = peak_activation_bytes(&vae, &z, DecodeKind::Bands(args.ranks))?;
        for (rank, peak) in peaks.iter().enumerate() {
            println!(
                "peak activation MiB, rank {rank} of {}: {:.1} ({:.3} x 1 rank)",
                args.ranks,
                mib(*peak),
                *peak as f64 / one as f64
            );
        }
    }
    Ok(())
}
