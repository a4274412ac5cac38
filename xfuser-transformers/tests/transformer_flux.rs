//! FluxTransformer2DModel against diffusers: tests/fixtures/flux/transformer/{dev,schnell}/ are
//! tiny random-weight models saved by diffusers (2 double and 2 single blocks of 4 heads of
//! 8, rotary axes (2, 2, 4); `dev` embeds the guidance), {dev,schnell}.safetensors one
//! forward as FluxPipeline runs it, in image layout: the unpacked latent `hidden_states`, the
//! conditioning, `timestep` on the transformer's [0, 1] scale (× 1000 here: the backbone takes
//! the scheduler's scale), and the unpacked `sample`
//! (scripts/fixtures/flux.py). Checked here: the serial forward, the forward split at every
//! block, PipeFusion stage pairs (split among the double and among the single blocks) passing
//! the text stream, and the sequence-parallel forwards (Ulysses, Ring, USP, padded splits) on
//! the local backend.

mod common;

use std::path::PathBuf;

use candle_core::Tensor;
use xfuser_core::backbone::{Backbone, Conditioning, ForwardContext, PipelineStage};
use xfuser_core::registry::{self, Kind, LoadOptions};
use xfuser_core::testing::{fixtures_dir, max_abs_diff, rel_l2, ForwardCase};
use xfuser_transformers::transformer_flux::{CLASS_NAME, ROPE_COS, ROPE_SIN, TEMB};

const MODELS: [&str; 2] = ["dev", "schnell"];

/// The conditioning a Flux forward reads (schnell's fixture has no `guidance`).
const FLUX_CONDITIONING: [&str; 3] = ["encoder_hidden_states", "pooled_projections", "guidance"];

fn flux_transformer_dir() -> PathBuf {
    fixtures_dir().join("flux").join("transformer")
}

fn load_with(model: &str, options: &LoadOptions) -> Box<dyn Backbone> {
    common::load_with(&flux_transformer_dir().join(model), options)
}

fn load(model: &str) -> Box<dyn Backbone> {
    load_with(model, &LoadOptions::default())
}

/// The fixture forward of `model`; `latent_rows` crops the latent (a token-row count that an
/// sp degree does not divide).
fn case(model: &str, latent_rows: Option<usize>) -> ForwardCase {
    let file = flux_transformer_dir().join(format!("{model}.safetensors"));
    let mut io = common::forward_case(&file, &FLUX_CONDITIONING, latent_rows);
    // The goldens hold diffusers' transformer scale t / 1000; the backbone takes the
    // scheduler's t.
    let t = (&io.tensors["timestep"] * 1000.0).unwrap();
    io.tensors.insert("timestep".into(), t);
    io
}

#[test]
fn serial_forward_matches_diffusers() {
    for model_name in MODELS {
        let model = load(model_name);
        let io = case(model_name, None);
        assert_eq!(
            io.conditioning.get("guidance").is_some(),
            model_name == "dev"
        );
        let out = model
            .forward(&io.inputs(), &ForwardContext::default())
            .unwrap();
        let err = rel_l2(&out, &io["sample"]).unwrap();
        println!("{model_name}: rel L2 {err:.3e} vs diffusers");
        assert!(err <= 1e-5, "{model_name}: rel L2 {err:.3e} > 1e-5");
        let one = model
            .forward_one_stream(&io.inputs(), &ForwardContext::default())
            .unwrap();
        let err = rel_l2(&one, &io["sample"]).unwrap();
        println!("{model_name}: one stream rel L2 {err:.3e} vs diffusers");
        assert!(err <= 1e-5, "{model_name} (one stream): rel L2 {err:.3e}");
    }
}

#[test]
fn info_and_registry() {
    assert!(registry::registered(Kind::Transformer).contains(&CLASS_NAME));
    let model = load("dev");
    let info = model.info();
    assert_eq!(info.class_name, CLASS_NAME);
    // 2 double + 2 single blocks.
    assert_eq!(
        (
            info.num_layers,
            info.num_attention_heads,
            info.attention_head_dim
        ),
        (4, 4, 8)
    );
    // The 2×2 packing: 64 values per token are 16 latent channels.
    assert_eq!(
        (info.in_channels, info.out_channels, info.patch_size),
        (16, 16, 2)
    );
    assert_eq!((info.sample_size, info.caption_channels), (128, 32));
    assert!(info.updates_text_stream);
    assert_eq!(model.held_layers(), 0..4);
    assert!(model.parameter_bytes().unwrap() > 0);
    let shape = registry::transformer_shape(&flux_transformer_dir().join("dev")).unwrap();
    assert_eq!((shape.num_attention_heads, shape.num_layers), (4, 4));
}

#[test]
fn block_state_carries_temb_rope_and_the_text_stream() {
    let model = load("dev");
    let io = case("dev", None);
    let ctx = ForwardContext::default();
    let state = model.embed(&io.inputs(), &ctx).unwrap();
    // An (8, 12) latent packs into a 4×6 token grid.
    assert_eq!(state.hidden.dims(), [2, 4 * 6, 32]);
    assert_eq!(state.encoder.as_ref().unwrap().dims(), [2, 7, 32]);
    assert_eq!(state.conditioning(TEMB).unwrap().dims(), [2, 32]);
    assert_eq!(state.conditioning(ROPE_COS).unwrap().dims(), [24, 4]);
    assert_eq!(state.conditioning(ROPE_SIN).unwrap().dims(), [24, 4]);
    assert_eq!(state.grid, (4, 6));
    assert!(state.encoder_bias.is_none());
    // The text stream goes through the double and the single blocks.
    let state = model.blocks(state, 0..2, &ctx).unwrap();
    assert_eq!(state.encoder.as_ref().unwrap().dims(), [2, 7, 32]);
    let state = model.blocks(state, 2..4, &ctx).unwrap();
    assert_eq!(state.encoder.as_ref().unwrap().dims(), [2, 7, 32]);
    let out = model.head(state, &ctx).unwrap();
    assert_eq!(out.dims(), [2, 16, 8, 12]);
}

#[test]
fn missing_conditioning_is_named() {
    // dev needs `guidance`.
    let model = load("dev");
    let mut io = case("dev", None);
    io.conditioning = Conditioning::new()
        .with("encoder_hidden_states", io["encoder_hidden_states"].clone())
        .with("pooled_projections", io["pooled_projections"].clone());
    let err = model
        .forward(&io.inputs(), &ForwardContext::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(CLASS_NAME) && err.contains("`guidance`"),
        "{err}"
    );
    // schnell does not, and needs the pooled text.
    let model = load("schnell");
    let mut io = case("schnell", None);
    io.conditioning =
        Conditioning::new().with("encoder_hidden_states", io["encoder_hidden_states"].clone());
    let err = model
        .forward(&io.inputs(), &ForwardContext::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(CLASS_NAME) && err.contains("`pooled_projections`"),
        "{err}"
    );
}

#[test]
fn odd_latent_sizes_are_refused() {
    let model = load("schnell");
    let mut io = case("schnell", None);
    let odd = Tensor::zeros(
        (2, 16, 8, 11),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    io.tensors.insert("hidden_states".into(), odd);
    let err = model
        .forward(&io.inputs(), &ForwardContext::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiples of 2"), "{err}");
}

#[test]
fn split_forward_equals_whole() {
    for model_name in MODELS {
        let io = case(model_name, None);
        common::assert_split_forward_equals_whole(
            load(model_name).as_ref(),
            &io.inputs(),
            model_name,
        );
    }
}

fn stage(index: usize, layer_counts: Option<Vec<usize>>) -> PipelineStage {
    PipelineStage {
        index,
        num_stages: 2,
        layer_counts,
    }
}

/// Two PipeFusion stages loaded apart: stage 0 embeds and runs its blocks, stage 1 embeds the
/// conditioning, takes the image tokens and the text stream from stage 0 (as the runtime
/// passes them), runs its blocks and the head. Splits: inside the double blocks (1 + 3),
/// between them and the single blocks (2 + 2), inside the single blocks (3 + 1).
#[test]
fn stage_pair_equals_whole() {
    for model_name in MODELS {
        let whole_model = load(model_name);
        let io = case(model_name, None);
        let (inputs, ctx) = (io.inputs(), ForwardContext::default());
        let whole = whole_model.forward_one_stream(&inputs, &ctx).unwrap();
        let whole_bytes = whole_model.parameter_bytes().unwrap();
        for counts in [Some(vec![1, 3]), None, Some(vec![3, 1])] {
            let options = |index| LoadOptions {
                stage: Some(stage(index, counts.clone())),
                ..LoadOptions::default()
            };
            let (first, second) = (
                load_with(model_name, &options(0)),
                load_with(model_name, &options(1)),
            );
            let split = first.held_layers().end;
            assert_eq!(first.held_layers(), 0..split);
            assert_eq!(second.held_layers(), split..4);
            for s in [&first, &second] {
                assert!(s.parameter_bytes().unwrap() < whole_bytes);
            }

            let sent = first
                .blocks(
                    first.embed(&inputs, &ctx).unwrap(),
                    first.held_layers(),
                    &ctx,
                )
                .unwrap();
            let mut state = second.embed_conditioning(&inputs, &ctx).unwrap();
            assert_eq!(state.hidden.dim(1).unwrap(), 0);
            state.hidden = sent.hidden.clone();
            state.encoder = Some(sent.encoder.clone().expect("the text stream is sent"));
            let state = second.blocks(state, second.held_layers(), &ctx).unwrap();
            let out = second.head(state, &ctx).unwrap();
            let diff = max_abs_diff(&out, &whole).unwrap();
            println!("{model_name} stages {counts:?}: max |diff| {diff:.3e} vs one model");
            assert_eq!(diff, 0.0, "{model_name} stages {counts:?}");

            // Each stage holds only its part.
            let err = second.embed(&inputs, &ctx).unwrap_err().to_string();
            assert!(err.contains("holds no patch embedding"), "{err}");
            let err = first.head(sent, &ctx).unwrap_err().to_string();
            assert!(err.contains("holds no final layer"), "{err}");
            let err = first
                .blocks(first.embed(&inputs, &ctx).unwrap(), 0..4, &ctx)
                .unwrap_err()
                .to_string();
            assert!(err.contains("are not held here"), "{err}");
        }
    }
}

/// Runs the sp forward with `processor` on every rank of a U×R mesh and checks each rank's
/// output against the serial forward (and, for the whole latent, against diffusers).
fn check_sp_forward(
    model_name: &str,
    latent_rows: Option<usize>,
    (u, r): (usize, usize),
    processor: &str,
    expect_padding: bool,
) {
    let model = load(model_name);
    let io = case(model_name, latent_rows);
    let inputs = io.inputs();
    let label = format!(
        "{model_name} {:?} u{u}×r{r} {processor}",
        inputs.hidden_states.dims()
    );
    let sp = common::sp_forward(
        model.as_ref(),
        &inputs,
        (u, r),
        processor,
        expect_padding,
        &label,
        |_| (),
    );
    if latent_rows.is_none() {
        let err = rel_l2(&sp.ranks[0].0, &io["sample"]).unwrap();
        assert!(err <= 1e-5, "{label}: rel L2 {err:.3e} vs diffusers");
    }
    println!(
        "{label}: padded len {} (padding: {expect_padding}), max rel L2 {:.3e} vs serial",
        sp.meta.full.slices[0].padded_len, sp.worst
    );
}

/// name: model, latent rows kept (None: all 8, a 4×6 token grid), (ulysses, ring),
/// processor, whether the split pads.
macro_rules! sp_parity {
    ($($name:ident: $model:literal, $rows:expr, $degrees:expr, $proc:literal, $pads:literal;)*) => {$(
        #[test]
        fn $name() {
            check_sp_forward($model, $rows, $degrees, $proc, $pads);
        }
    )*};
}

// 6 latent rows: 3 token rows, which 2 ranks split 2 + 1 (padded) and 4 ranks 1 + 1 + 1 + 0.
sp_parity! {
    ulysses2_dev: "dev", None, (2, 1), "ulysses", false;
    ulysses2_schnell_padded: "schnell", Some(6), (2, 1), "ulysses", true;
    ring2_schnell: "schnell", None, (1, 2), "ring", false;
    ring2_dev_padded: "dev", Some(6), (1, 2), "ring", true;
    usp2x2_dev: "dev", None, (2, 2), "usp", false;
    usp2x2_schnell_padded_empty_rank: "schnell", Some(6), (2, 2), "usp", true;
}

#[test]
fn sp_context_without_parallel_processor_is_refused() {
    let io = case("schnell", None);
    common::assert_sp_without_processor_refused(load("schnell").as_ref(), &io.inputs());
}

#[test]
fn unsupported_patch_size_is_refused_naming_the_field() {
    let t = common::TempModel::new(&flux_transformer_dir().join("schnell"), "patch-size");
    t.edit_config(|c| {
        c.insert("patch_size".into(), 2.into());
    });
    let err = t.load_error();
    assert!(err.contains("patch_size") && err.contains("2×2"), "{err}");
}

/// A PipeFusion patch (here the second of two, split over 2 sp ranks) embeds its own token
/// rows with the rotary tables of their place in the whole grid: each rank's tokens and
/// tables are its rows of the whole forward's.
#[test]
fn a_patch_takes_its_rows_of_the_rotary_tables() {
    use xfuser_core::backbone::SpContext;
    use xfuser_core::distributed::{launch_local, LaunchOptions, RuntimeState};

    let model = load("dev");
    let io = case("dev", None);
    let ctx = ForwardContext::default();
    let whole = model.embed(&io.inputs(), &ctx).unwrap();
    let (batch, _, h, w) = io["hidden_states"].dims4().unwrap();
    let mesh = common::mesh(2, 1);
    let mut runtime = RuntimeState::new(&mesh, 2, 8, Some(2));
    let meta = runtime
        .set_input_parameters(h * 8, w * 8, batch, 1)
        .unwrap()
        .clone();
    let patch = meta.patches[1].clone();
    assert_eq!(patch.token_rows, 2..4);
    let states = launch_local(&mesh, &LaunchOptions::default(), |rank| {
        let sp = SpContext::from_rank(&rank, patch.clone())?;
        let slice = sp.slice().clone();
        let fctx = ForwardContext::sequence_parallel("ulysses", sp)?;
        let state = model.embed(&io.inputs(), &fctx)?;
        let conditioning = model.embed_conditioning(&io.inputs(), &fctx)?;
        Ok((slice, state, conditioning))
    })
    .unwrap();
    for (slice, state, conditioning) in states {
        let (start, len) = (slice.tokens.start, slice.tokens.len);
        assert_eq!(state.grid, (2, 6));
        assert_eq!(conditioning.grid, (2, 6));
        // A rank's real tokens come first, then its padding.
        let rows = |t: &Tensor, dim| t.narrow(dim, 0, len).unwrap();
        assert_eq!(
            max_abs_diff(
                &rows(&state.hidden, 1),
                &whole.hidden.narrow(1, start, len).unwrap()
            )
            .unwrap(),
            0.0
        );
        for name in [ROPE_COS, ROPE_SIN] {
            let expected = whole
                .conditioning(name)
                .unwrap()
                .narrow(0, start, len)
                .unwrap();
            for s in [&state, &conditioning] {
                let got = s.conditioning(name).unwrap();
                assert_eq!(got.dim(0).unwrap(), slice.padded_len);
                assert_eq!(
                    max_abs_diff(&rows(got, 0), &expected).unwrap(),
                    0.0,
                    "{name}"
                );
            }
        }
    }
}

/// Tensor parallelism at degree 2: each rank loads its shard (half the heads of every
/// attention, both streams' projections in the double blocks, half the MLP features, and the
/// single blocks' `proj_out` cut per [attention, mlp] segment), and the all-reduced forward
/// equals diffusers' on both ranks.
#[test]
fn tp2_shards_forward_like_the_whole_model() {
    use xfuser_core::distributed::{launch_local, LaunchOptions, RankMesh, TpRank};
    use xfuser_core::engine::ParallelConfig;
    for model_name in MODELS {
        let shards: Vec<_> = (0..2)
            .map(|i| {
                let options = LoadOptions {
                    tp: TpRank::new(i, 2).unwrap(),
                    ..Default::default()
                };
                load_with(model_name, &options)
            })
            .collect();
        let io = case(model_name, None);
        let mesh = RankMesh::new(&ParallelConfig {
            tensor_parallel_degree: 2,
            ..Default::default()
        })
        .unwrap();
        let outs = launch_local(&mesh, &LaunchOptions::default(), |rank| {
            let ctx = ForwardContext::default().with_tp(Some(rank.tp_group().clone()));
            shards[rank.coords().tp].forward(&io.inputs(), &ctx)
        })
        .unwrap();
        for (r, out) in outs.iter().enumerate() {
            let err = rel_l2(out, &io["sample"]).unwrap();
            println!("{model_name} tp 2 rank {r}: rel L2 {err:.3e} vs diffusers");
            assert!(err <= 1e-5, "{model_name} tp rank {r}: rel L2 {err:.3e}");
        }
    }
}

/// The bytes of the split layers in a shard of `t`, from the config (f32): column-parallel
/// weights and biases 1/T; row-parallel weights 1/T, their biases whole. A double block: six
/// q/k/v projections, `to_out.0` and `to_add_out`, two feed-forwards; a single block: q/k/v,
/// `proj_mlp`, `proj_out` over D + 4·D inputs.
fn flux_split_bytes(cfg: &xfuser_transformers::transformer_flux::Config, t: usize) -> u64 {
    let d = cfg.inner_dim();
    let column = |inp: usize, out: usize| (out * inp + out) / t;
    let row = |inp: usize, out: usize| out * inp / t + out;
    let ff = column(d, 4 * d) + row(4 * d, d);
    let double = 6 * column(d, d) + 2 * row(d, d) + 2 * ff;
    let single = 3 * column(d, d) + column(d, 4 * d) + row(5 * d, d);
    ((cfg.num_layers * double + cfg.num_single_layers * single) * 4) as u64
}

/// A shard keeps 1/T of the split layers (row-parallel biases whole) and every replicated
/// module whole; a shard run without its tp group refuses rather than return partial sums.
#[test]
fn a_tp_shard_holds_its_share_and_needs_its_group() {
    use xfuser_core::distributed::TpRank;
    use xfuser_transformers::transformer_flux::{Config, FluxTransformer2DModel};
    let dir = flux_transformer_dir().join("dev");
    let cfg: Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let serial = FluxTransformer2DModel::load(&dir, &LoadOptions::default()).unwrap();
    let serial_split = serial.split_parameter_bytes();
    assert_eq!(serial_split, flux_split_bytes(&cfg, 1));
    let serial_total = serial.parameter_bytes().unwrap();
    for t in [2, 4] {
        for index in 0..t {
            let options = LoadOptions {
                tp: TpRank::new(index, t).unwrap(),
                ..Default::default()
            };
            let shard = FluxTransformer2DModel::load(&dir, &options).unwrap();
            let split = shard.split_parameter_bytes();
            println!("tp {t} shard {index}: split layers {split} of {serial_split} bytes");
            assert_eq!(split, flux_split_bytes(&cfg, t));
            assert_eq!(
                shard.parameter_bytes().unwrap(),
                serial_total - serial_split + split
            );
            assert_eq!(shard.tp_rank(), options.tp);
        }
    }
    let options = LoadOptions {
        tp: TpRank::new(1, 2).unwrap(),
        ..Default::default()
    };
    let shard = load_with("dev", &options);
    let io = case("dev", None);
    let err = shard
        .forward(&io.inputs(), &ForwardContext::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor-parallel shard 1 of 2"), "{err}");
}

/// A shard of a degree that does not give every rank whole heads is refused, naming the flag
/// and the heads.
#[test]
fn a_tp_degree_that_does_not_divide_the_heads_is_refused() {
    use xfuser_core::distributed::TpRank;
    let options = LoadOptions {
        tp: TpRank::new(0, 3).unwrap(),
        ..Default::default()
    };
    let err = match registry::load_transformer(&flux_transformer_dir().join("dev"), &options) {
        Ok(_) => panic!("tp 3 of 4 heads should be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("--tensor-parallel-degree 3") && err.contains("4 attention heads"),
        "{err}"
    );
}
