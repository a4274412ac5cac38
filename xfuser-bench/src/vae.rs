//! `vae`: the VAE decode of one image with the full-size PixArt VAE (random weights), serial
//! (candle-transformers' decoder) against the patch-parallel decode on `--ranks` rank
//! threads: the time of each, the float error of the parallel image, and the peak activation
//! bytes of each rank (`parallel_vae::peak_activation_bytes`: every rank on a one-thread
//! pool, counted by the tagged global allocator this binary installs).
//!
//! With `--one-process candle|bands` it decodes once in this process instead and prints the
//! time and the process's peak resident memory (VmHWM); started by `mpirun -n N` (a build
//! with `--features mpi`), the band decoder splits the rows over the N processes and rank 0
//! prints every process's peak. That is the measure once ranks are processes: the
//! whole process (weights, allocator, MPI buffers), not only the activations.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::{Args, ValueEnum};
use xfuser_core::distributed::{
    launch_local, process_world, CommStats, LaunchOptions, ProcessGroup, RankMesh,
};
use xfuser_core::engine::ParallelConfig;
use xfuser_core::testing::rel_l2;
use xfuser_pipelines::parallel_vae::{peak_activation_bytes, DecodeKind};
use xfuser_pipelines::vae::{AutoencoderKL, VaeConfig};

use crate::{peak_rss_kib, RandomWeights};

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
    /// Decode once in this process with this decoder and print the time and the peak
    /// resident memory; under mpirun, `bands` splits the rows over the launched processes.
    #[arg(long, value_enum)]
    one_process: Option<OneProcess>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OneProcess {
    /// candle-transformers' decoder, the serial decode of the pipelines.
    Candle,
    /// The band decoder of `--use-parallel-vae`, on one rank or on every launched process.
    Bands,
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
    if let Some(decoder) = args.one_process {
        return one_process(args.latent, decoder);
    }
    if args.ranks < 2 {
        bail!("--ranks must be at least 2");
    }
    let vae = random_vae()?;
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
        let serial_image = vae.decode_candle(&z)?;
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
            let serial = peak_activation_bytes(&vae, &z, DecodeKind::Candle)?[0];
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

/// The full-size PixArt VAE with the bench's deterministic random weights (the same in every
/// process).
fn random_vae() -> Result<AutoencoderKL> {
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    Ok(AutoencoderKL::from_var_builder(
        pixart_vae_config()?,
        vb,
        DType::F32,
        Path::new("<random weights>"),
    )?)
}

/// One decode of a `latent`² latent in this process (or over the launched processes), timed
/// after a warm-up decode of an 8×8 latent (which also builds the band decoder's weights).
fn one_process(latent: usize, decoder: OneProcess) -> Result<()> {
    let vae = random_vae()?;
    // Seeded, so every process of a launched job decodes the same latent.
    let z = xfuser_core::random::Generator::manual_seed(0)
        .randn_tensor(&[1, 4, latent, latent], &Device::Cpu)?;
    let small = z.narrow(2, 0, 8)?.narrow(3, 0, 8)?;
    let side = latent * 8;
    let Some(world) = process_world() else {
        let decode = |z: &Tensor| -> Result<()> {
            match decoder {
                OneProcess::Candle => drop(vae.decode_candle(z)?),
                OneProcess::Bands => {
                    let mesh = RankMesh::new(&ParallelConfig::default())?;
                    launch_local(&mesh, &LaunchOptions::default(), |ctx| {
                        vae.decode_parallel(z, ctx.world()).map(drop)
                    })?;
                }
            }
            Ok(())
        };
        decode(&small)?;
        let start = Instant::now();
        decode(&z)?;
        let seconds = start.elapsed().as_secs_f64();
        let name = match decoder {
            OneProcess::Candle => "candle decoder",
            OneProcess::Bands => "band decoder",
        };
        println!(
            "image {side}x{side}: {name}, 1 process: {seconds:.2} s, peak RSS {:.1} MiB",
            peak_rss_kib()? as f64 / 1024.0
        );
        // For scripts/bench_compare.py.
        println!("rust_seconds={seconds:.4}");
        return Ok(());
    };
    if decoder != OneProcess::Bands {
        bail!("--one-process candle decodes serially; run it without mpirun");
    }
    let mesh = RankMesh::new(&ParallelConfig {
        ulysses_degree: world.size(),
        ..Default::default()
    })?;
    let stats = CommStats::new();
    // A 2048 px decode's slowest collective can wait minutes for the other rank.
    let rank = world.rank_context(&mesh, &stats, std::time::Duration::from_secs(3600))?;
    let group: &ProcessGroup = rank.world();
    vae.decode_parallel(&small, group)?;
    group.barrier()?;
    let start = Instant::now();
    vae.decode_parallel(&z, group)?;
    group.barrier()?;
    let seconds = start.elapsed().as_secs_f64();
    let own = u32::try_from(peak_rss_kib()?)?;
    let peaks = group.all_gather_tensors(&Tensor::new(&[own], &Device::Cpu)?)?;
    if world.rank() == 0 {
        let peaks = peaks
            .iter()
            .map(|p| Ok(format!("{:.1}", p.to_vec1::<u32>()?[0] as f64 / 1024.0)))
            .collect::<Result<Vec<_>>>()?;
        println!(
            "image {side}x{side}: band decoder, {} processes: {seconds:.2} s, peak RSS per \
             process MiB [{}]",
            world.size(),
            peaks.join(", ")
        );
    }
    Ok(())
}
