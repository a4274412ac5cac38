//! PixArtTransformer2DModel under sequence parallelism (Ulysses, Ring, USP) on the local
//! backend: every rank's output equals the serial forward, the traffic equals the cost model,
//! and impossible degrees fail before any work.

mod common;

use std::collections::BTreeMap;

use candle_core::Tensor;
use common::{mesh, on_sp_ranks, pixart_dir, sp_metadata, PIXART_CONDITIONING};
use xfuser_core::backbone::Backbone;
use xfuser_core::distributed::{CommCounts, CommOp, LaunchOptions};
use xfuser_core::registry::{self, Kind};
use xfuser_core::testing::ForwardCase;
// Links the crate so that its registry entries (the backbone, and through xfuser-layers the
// attention processors) are collected.
use xfuser_transformers::pixart_transformer_2d::CLASS_NAME;

fn load(model: &str) -> Box<dyn Backbone> {
    common::load(&pixart_dir(model))
}

/// The inputs of a fixture case; `latent_rows` crops the latent (to make a token-row count
/// that the sp degree does not divide).
fn case_inputs(model: &str, case: &str, latent_rows: Option<usize>) -> ForwardCase {
    let file = pixart_dir(model).join(format!("io_{case}.safetensors"));
    common::forward_case(&file, &PIXART_CONDITIONING, latent_rows)
}

/// Bytes one rank sends per forward, from the shapes (see xfuser_layers::attention_processor):
/// Ulysses, on the ulysses group, 4 all-to-alls per layer of (U−1)/U of the local q/k/v/o,
/// each B·H·P·Dh elements; Ring, on the ring group, R−1 steps per layer each sending the local
/// k and v blocks of B·H·P·Dh elements.
fn expected_bytes(
    model: &dyn Backbone,
    batch: usize,
    padded_len: usize,
    u: usize,
    r: usize,
) -> (u64, u64) {
    let info = model.info();
    let elem = 4; // f32
    let local =
        (batch * info.num_attention_heads * padded_len * info.attention_head_dim * elem) as u64;
    let layers = info.num_layers as u64;
    let (u, r) = (u as u64, r as u64);
    let ulysses = 4 * (u - 1) * local / u * layers;
    let ring = 2 * (r - 1) * local * layers;
    (ulysses, ring)
}

/// Runs the sp forward with `processor` on every rank of a U×R mesh and checks it against the
/// serial forward and the cost model.
fn check_sp_forward(
    model_name: &str,
    case: &str,
    latent_rows: Option<usize>,
    (u, r): (usize, usize),
    processor: &str,
    expect_padding: bool,
) {
    let model = load(model_name);
    let io = case_inputs(model_name, case, latent_rows);
    let inputs = io.inputs();
    let latent = inputs.hidden_states.dims();
    let label = format!("{model_name}/{case} {latent:?} u{u}×r{r} {processor}");
    let sp = common::sp_forward(
        model.as_ref(),
        &inputs,
        (u, r),
        processor,
        expect_padding,
        &label,
        |ctx| {
            (
                ctx.ulysses_group().comm_stats(),
                ctx.ring_group().comm_stats(),
            )
        },
    );

    let batch = latent[0];
    let padded_len = sp.meta.full.slices[0].padded_len;
    let (ulysses_bytes, ring_bytes) = expected_bytes(model.as_ref(), batch, padded_len, u, r);
    let layers = model.info().num_layers as u64;
    for (rank, (_, (ulysses, ring))) in sp.ranks.iter().enumerate() {
        let a2a = ulysses.get(&CommOp::AllToAll).copied().unwrap_or_default();
        assert_eq!(
            a2a.bytes_sent, ulysses_bytes,
            "{label}: rank {rank} all_to_all"
        );
        assert_eq!(a2a.bytes_received, ulysses_bytes, "{label}: rank {rank}");
        assert_eq!(a2a.calls, if u > 1 { 4 * layers } else { 0 }, "{label}");
        let send = ring.get(&CommOp::Send).copied().unwrap_or_default();
        let recv = ring.get(&CommOp::Recv).copied().unwrap_or_default();
        assert_eq!(
            send.bytes_sent, ring_bytes,
            "{label}: rank {rank} ring sends"
        );
        assert_eq!(
            recv.bytes_received, ring_bytes,
            "{label}: rank {rank} ring recvs"
        );
        assert_eq!(send.calls, 2 * (r as u64 - 1) * layers, "{label}");
        // Nothing else travels on these groups (the head gathers on the sp group).
        let other = |stats: &BTreeMap<CommOp, CommCounts>, op| {
            stats
                .iter()
                .filter(|(o, _)| **o != op && **o != CommOp::Recv)
                .map(|(_, c)| c.bytes_sent)
                .sum::<u64>()
        };
        assert_eq!(other(ulysses, CommOp::AllToAll), 0, "{label}");
        assert_eq!(other(ring, CommOp::Send), 0, "{label}");
    }
    println!(
        "{label}: padded len {padded_len} (padding: {expect_padding}), max rel L2 {:.3e}, per \
         rank ulysses all_to_all {ulysses_bytes} B, ring send {ring_bytes} B",
        sp.worst
    );
}

/// One test per configuration: name: model, case, latent rows kept (None: all),
/// (ulysses, ring), processor, whether the split pads.
macro_rules! sp_parity {
    ($($name:ident: $model:literal, $case:literal, $rows:expr, $degrees:expr, $proc:literal,
       $pads:literal;)*) => {$(
        #[test]
        fn $name() {
            check_sp_forward($model, $case, $rows, $degrees, $proc, $pads);
        }
    )*};
}

// Grids (token rows × cols): alpha/nonsquare_mask 4×6 (B 2, text mask, size conditioning,
// 2 heads), alpha/square 4×4, sigma/batch_mask 4×4 (B 2, mask, 4 heads), sigma/nonsquare 6×4,
// cropped to 10 latent rows 5×4.
sp_parity! {
    u2_alpha_masked_batch: "alpha", "nonsquare_mask", None, (2, 1), "ulysses", false;
    u2_sigma_padded: "sigma", "nonsquare", Some(10), (2, 1), "ulysses", true;
    u4_sigma_masked_batch: "sigma", "batch_mask", None, (4, 1), "ulysses", false;
    u4_sigma_padded: "sigma", "nonsquare", None, (4, 1), "ulysses", true;
    r2_sigma_masked_batch: "sigma", "batch_mask", None, (1, 2), "ring", false;
    r2_sigma_padded: "sigma", "nonsquare", Some(10), (1, 2), "ring", true;
    r4_alpha_square: "alpha", "square", None, (1, 4), "ring", false;
    r4_sigma_padded: "sigma", "nonsquare", Some(10), (1, 4), "ring", true;
    u2r2_sigma_masked_batch: "sigma", "batch_mask", None, (2, 2), "usp", false;
    u2r2_sigma_padded: "sigma", "nonsquare", None, (2, 2), "usp", true;
    u2r2_alpha_masked_batch: "alpha", "nonsquare_mask", None, (2, 2), "usp", false;
    usp_processor_on_u2: "sigma", "nonsquare", Some(10), (2, 1), "usp", true;
    usp_processor_on_r2: "sigma", "nonsquare", Some(10), (1, 2), "usp", true;
}

#[test]
fn ulysses_degree_not_dividing_heads_fails_before_any_work() {
    // alpha has 2 heads.
    let io = case_inputs("alpha", "square", None);
    common::assert_ulysses_degree_refused(load("alpha").as_ref(), &io.inputs());
}

#[test]
fn sp_context_without_parallel_processor_is_refused() {
    let io = case_inputs("sigma", "batch_mask", None);
    common::assert_sp_without_processor_refused(load("sigma").as_ref(), &io.inputs());
}

#[test]
fn sp_split_of_another_shape_is_refused() {
    let model = load("sigma");
    let io = case_inputs("sigma", "nonsquare", None);
    let inputs = io.inputs();
    // nonsquare is 12×8: a split computed for a 12×12 latent does not fit.
    let other = Tensor::zeros(
        (1, 4, 12, 12),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mesh = mesh(2, 1);
    let meta = sp_metadata(model.as_ref(), &mesh, &other);
    let err = on_sp_ranks(
        &mesh,
        &LaunchOptions::default(),
        &meta,
        Some("ulysses"),
        |_, fctx| model.forward(&inputs, fctx),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("compute the runtime state"), "{err}");
}

#[test]
fn attention_processors_are_registered() {
    assert!(registry::registered(Kind::Transformer).contains(&CLASS_NAME));
    assert_eq!(
        registry::registered(Kind::AttentionProcessor),
        vec!["pipefusion", "ring", "serial", "ulysses", "usp"]
    );
    let err = registry::attention_processor_entry("flash")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("ring, serial, ulysses, usp"), "{err}");
}
