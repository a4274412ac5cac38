//! Peak activation memory of the patch-parallel VAE decode per rank, against the serial
//! decode (the band decoder on one rank; candle-transformers' decoder printed beside it),
//! counted by `xfuser_core::alloc::TaggedAllocator` (installed here as the global allocator;
//! the method is documented on `parallel_vae::peak_activation_bytes`). A test binary of its
//! own, so that no other test runs under the counting allocator.

use candle_core::{DType, Device, Tensor};
use xfuser_core::alloc::TaggedAllocator;
use xfuser_core::testing::fixtures_dir;
use xfuser_pipelines::parallel_vae::{peak_activation_bytes, DecodeKind};
use xfuser_pipelines::vae::AutoencoderKL;

#[global_allocator]
static ALLOCATOR: TaggedAllocator = TaggedAllocator;

#[test]
fn each_of_two_ranks_peaks_at_most_0_6_of_the_serial_decode() {
    let dir = fixtures_dir().join("pipelines/tiny-pixart-alpha/vae");
    let vae = AutoencoderKL::load(&dir, DType::F32, &Device::Cpu).unwrap();
    // A 256 x 256 image: large enough that activations, not per-op constants, dominate.
    let z = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &Device::Cpu).unwrap();
    let candle = peak_activation_bytes(&vae, &z, DecodeKind::Candle).unwrap()[0];
    let serial = peak_activation_bytes(&vae, &z, DecodeKind::Bands(1)).unwrap()[0];
    let two = peak_activation_bytes(&vae, &z, DecodeKind::Bands(2)).unwrap();
    let four = peak_activation_bytes(&vae, &z, DecodeKind::Bands(4)).unwrap();
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "peak activation MiB: candle's decoder {:.2}, bands on 1 rank (serial) {:.2}, on 2 ranks {:?}, on 4 ranks {:?}",
        mib(candle),
        mib(serial),
        two.iter().map(|&b| mib(b)).collect::<Vec<_>>(),
        four.iter().map(|&b| mib(b)).collect::<Vec<_>>()
    );
    assert!(serial > 0 && candle > 0);
    for (n, peaks) in [(2, &two), (4, &four)] {
        for (rank, &peak) in peaks.iter().enumerate() {
            let ratio = peak as f64 / serial as f64;
            assert!(
                ratio <= 0.6 * 2.0 / n as f64,
                "{n} ranks, rank {rank}: {ratio:.3} x serial"
            );
        }
    }
}

#[test]
fn a_tag_counts_the_live_bytes_its_thread_allocated() {
    // The allocator is installed here, so the check passes; a tag's counters move with
    // allocations on its thread only.
    assert!(xfuser_core::alloc::tagged_allocator_installed());
    xfuser_core::alloc::set_thread_tag(7);
    xfuser_core::alloc::reset_peak(7);
    let (before, _) = xfuser_core::alloc::tag_stats(7);
    let block = vec![1u8; 1 << 20];
    let (during, peak) = xfuser_core::alloc::tag_stats(7);
    drop(block);
    let (after, _) = xfuser_core::alloc::tag_stats(7);
    xfuser_core::alloc::set_thread_tag(0);
    assert_eq!(during - before, 1 << 20);
    assert!(peak >= during);
    assert_eq!(after, before);
}
