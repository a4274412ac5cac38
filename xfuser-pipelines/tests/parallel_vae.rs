//! The patch-parallel VAE decode (`xfuser_pipelines::parallel_vae`) against the serial decode
//! it replaces (candle-transformers' `AutoEncoderKL`, itself checked against diffusers in
//! vae_image.rs): on 2 and 4 ranks, square and non-square latents, heights the rank count does
//! not divide, a batch of two.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use xfuser_core::distributed::{launch_local, LaunchOptions, RankMesh};
use xfuser_core::engine::ParallelConfig;
use xfuser_core::testing::{fixtures_dir, rel_l2};
use xfuser_core::Result;
use xfuser_pipelines::image::postprocess_u8;
use xfuser_pipelines::vae::AutoencoderKL;

fn vae_dir() -> PathBuf {
    fixtures_dir().join("pipelines/tiny-pixart-alpha/vae")
}

fn mesh_of(n: usize) -> RankMesh {
    RankMesh::new(&ParallelConfig {
        ulysses_degree: n,
        ..Default::default()
    })
    .unwrap()
}

/// Latents of a fixed pattern (values of a unit-variance scale, like denoised latents).
fn latents(dims: [usize; 4]) -> Tensor {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| (i as f32 * 0.731).sin() * 1.3 + (i as f32 * 0.057).cos() * 0.4)
        .collect();
    Tensor::from_vec(values, &dims, &Device::Cpu).unwrap()
}

/// The image member 0 of an `n`-rank world gets from the parallel decode.
fn decode_parallel(vae: &AutoencoderKL, z: &Tensor, n: usize) -> Result<Tensor> {
    let images = launch_local(&mesh_of(n), &LaunchOptions::default(), |ctx| {
        vae.decode_parallel(z, ctx.world())
    })?;
    let mut images = images.into_iter();
    let first = images.next().flatten();
    assert!(
        images.all(|i| i.is_none()),
        "only member 0 returns the image"
    );
    Ok(first.expect("member 0 returns the image"))
}

fn max_u8_diff(a: &Tensor, b: &Tensor) -> u8 {
    let a = postprocess_u8(a).unwrap().flatten_all().unwrap();
    let b = postprocess_u8(b).unwrap().flatten_all().unwrap();
    let (a, b) = (a.to_vec1::<u8>().unwrap(), b.to_vec1::<u8>().unwrap());
    a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn band_decode_on_1_2_and_4_ranks_equals_candles_decoder() {
    let vae = AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu).unwrap();
    // Square (8 rows: even bands), non-square with 7 rows (4+3 on 2 ranks, 2+2+2+1 on 4), and
    // a batch of two with 6 rows (2+2+1+1 on 4 ranks). The reference is candle-transformers'
    // decoder; one rank is the serial decode (`decode`), the whole image as one band.
    for dims in [[1, 4, 8, 8], [1, 4, 7, 10], [2, 4, 6, 9]] {
        let z = latents(dims);
        let serial = vae.decode_candle(&z).unwrap();
        for n in [1, 2, 4] {
            let parallel = match n {
                1 => vae.decode(&z).unwrap(),
                n => decode_parallel(&vae, &z, n).unwrap(),
            };
            assert_eq!(parallel.dims(), serial.dims(), "{dims:?} on {n} ranks");
            let err = rel_l2(&parallel, &serial).unwrap();
            let pixels = max_u8_diff(&parallel, &serial);
            eprintln!("latent {dims:?} on {n} ranks: rel L2 {err:.3e}, max u8 diff {pixels}");
            assert!(err < 1e-5, "{dims:?} on {n} ranks: rel L2 {err}");
            assert!(pixels <= 1, "{dims:?} on {n} ranks: u8 diff {pixels}");
        }
    }
}

#[test]
fn parallel_decode_refuses_more_ranks_than_latent_rows() {
    let vae = AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu).unwrap();
    let z = latents([1, 4, 3, 8]);
    let err = decode_parallel(&vae, &z, 4).unwrap_err().to_string();
    assert!(
        err.contains("--use-parallel-vae") && err.contains("3 rows") && err.contains("4 ranks"),
        "{err}"
    );
}
