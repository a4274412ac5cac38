//! SD3Transformer2DModel against diffusers: tests/fixtures/sd3/transformer/{sd3,sd35}/ are tiny
//! random-weight models saved by diffusers (an SD3.0 config, and an SD3.5 one with RMS q/k
//! norms and dual attention in blocks 0 and 1), {sd3,sd35}.safetensors one forward's inputs
//! and its `sample` (scripts/fixtures/sd3.py). Checked here: the serial forward, the forward
//! split at every block, a pair of PipeFusion stages passing the text stream, and the
//! sequence-parallel forwards (Ulysses, Ring, USP, padded splits) on the local backend.

mod common;

use candle_core::Tensor;
use common::{sd3_transformer_dir, TempModel, SD3_CONDITIONING};
use xfuser_core::backbone::{Backbone, ForwardContext, PipelineStage};
use xfuser_core::registry::{self, Kind, LoadOptions};
use xfuser_core::testing::{max_abs_diff, rel_l2, ForwardCase};
use xfuser_transformers::transformer_sd3::{Config, CLASS_NAME, TEMB};

const MODELS: [&str; 2] = ["sd3", "sd35"];

fn load_with(model: &str, options: &LoadOptions) -> Box<dyn Backbone> {
    common::load_with(&sd3_transformer_dir().join(model), options)
}

fn load(model: &str) -> Box<dyn Backbone> {
    load_with(model, &LoadOptions::default())
}

/// The fixture forward of `model`; `latent_rows` crops the latent (a token-row count that an
/// sp degree does not divide).
fn case(model: &str, latent_rows: Option<usize>) -> ForwardCase {
    let file = sd3_transformer_dir().join(format!("{model}.safetensors"));
    common::forward_case(&file, &SD3_CONDITIONING, latent_rows)
}

#[test]
fn serial_forward_matches_diffusers() {
    for model_name in MODELS {
        let model = load(model_name);
        let io = case(model_name, None);
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
    let model = load("sd35");
    let info = model.info();
    assert_eq!(info.class_name, CLASS_NAME);
    assert_eq!(
        (
            info.num_layers,
            info.num_attention_heads,
            info.attention_head_dim
        ),
        (3, 2, 8)
    );
    assert_eq!(
        (info.in_channels, info.out_channels, info.patch_size),
        (16, 16, 2)
    );
    assert_eq!((info.sample_size, info.caption_channels), (8, 48));
    assert!(info.updates_text_stream);
    assert_eq!(model.held_layers(), 0..3);
    assert!(model.parameter_bytes().unwrap() > 0);
    let shape = registry::transformer_shape(&sd3_transformer_dir().join("sd35")).unwrap();
    assert_eq!((shape.num_attention_heads, shape.num_layers), (2, 3));
}

#[test]
fn block_state_carries_temb_and_the_text_stream() {
    let model = load("sd3");
    let io = case("sd3", None);
    let ctx = ForwardContext::default();
    let state = model.embed(&io.inputs(), &ctx).unwrap();
    assert_eq!(state.hidden.dims(), [2, 4 * 6, 16]);
    assert_eq!(state.encoder.as_ref().unwrap().dims(), [2, 10, 16]);
    assert_eq!(state.conditioning(TEMB).unwrap().dims(), [2, 16]);
    assert_eq!(state.grid, (4, 6));
    assert!(state.encoder_bias.is_none());
    // The text stream ends with the last (context_pre_only) block.
    let state = model.blocks(state, 0..2, &ctx).unwrap();
    assert!(state.encoder.is_some());
    let state = model.blocks(state, 2..3, &ctx).unwrap();
    assert!(state.encoder.is_none());
    let err = model.blocks(state, 2..3, &ctx).unwrap_err().to_string();
    assert!(err.contains("needs the text stream"), "{err}");
}

#[test]
fn missing_conditioning_is_named() {
    let model = load("sd3");
    let mut io = case("sd3", None);
    io.conditioning = xfuser_core::backbone::Conditioning::new()
        .with("encoder_hidden_states", io["encoder_hidden_states"].clone());
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
fn latent_larger_than_the_position_table_is_refused() {
    // pos_embed_max_size 16 patches: a 34-row latent has 17 patch rows.
    let model = load("sd3");
    let mut io = case("sd3", None);
    let big = Tensor::zeros(
        (2, 16, 34, 12),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    io.tensors.insert("hidden_states".into(), big);
    let err = model
        .forward(&io.inputs(), &ForwardContext::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pos_embed_max_size of 16"), "{err}");
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
/// passes them), runs its blocks and the head.
#[test]
fn stage_pair_equals_whole() {
    for model_name in MODELS {
        let whole_model = load(model_name);
        let io = case(model_name, None);
        let (inputs, ctx) = (io.inputs(), ForwardContext::default());
        let whole = whole_model.forward_one_stream(&inputs, &ctx).unwrap();
        let whole_bytes = whole_model.parameter_bytes().unwrap();
        for counts in [None, Some(vec![2, 1]), Some(vec![1, 2])] {
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
            assert_eq!(second.held_layers(), split..3);
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
                .blocks(first.embed(&inputs, &ctx).unwrap(), 0..3, &ctx)
                .unwrap_err()
                .to_string();
            assert!(err.contains("are not held here"), "{err}");
        }
    }
}

/// Runs the sp forward with `processor` on every rank of a U×R mesh and checks each rank's
/// output against the serial forward.
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
    ulysses2_sd3: "sd3", None, (2, 1), "ulysses", false;
    ulysses2_sd35: "sd35", None, (2, 1), "ulysses", false;
    ulysses2_sd35_padded: "sd35", Some(6), (2, 1), "ulysses", true;
    ring2_sd3: "sd3", None, (1, 2), "ring", false;
    ring2_sd35: "sd35", None, (1, 2), "ring", false;
    ring2_sd3_padded: "sd3", Some(6), (1, 2), "ring", true;
    usp2x2_sd3: "sd3", None, (2, 2), "usp", false;
    usp2x2_sd35: "sd35", None, (2, 2), "usp", false;
    usp2x2_sd35_padded_empty_rank: "sd35", Some(6), (2, 2), "usp", true;
}

#[test]
fn ulysses_degree_not_dividing_heads_fails_before_any_work() {
    // The fixtures have 2 heads.
    let io = case("sd35", None);
    common::assert_ulysses_degree_refused(load("sd35").as_ref(), &io.inputs());
}

#[test]
fn sp_context_without_parallel_processor_is_refused() {
    let io = case("sd3", None);
    common::assert_sp_without_processor_refused(load("sd3").as_ref(), &io.inputs());
}

#[test]
fn unsupported_qk_norm_is_refused_naming_the_field() {
    let t = TempModel::new(&sd3_transformer_dir().join("sd35"), "qk-norm");
    t.edit_config(|c| {
        assert_eq!(c["qk_norm"], "rms_norm");
        c.insert("qk_norm".into(), "layer_norm".into());
    });
    let err = t.load_error();
    assert!(
        err.contains("qk_norm") && err.contains("layer_norm"),
        "{err}"
    );
    // The shape alone is still readable (the degrees are checked before the weights).
    let cfg: Config = serde_json::from_str(r#"{"qk_norm": "layer_norm"}"#).unwrap();
    assert_eq!(cfg.validate().unwrap_err().field, "qk_norm");
}

/// Tensor parallelism at degree 2: each rank loads its shard (half the heads of every
/// attention, SD3.5's qk norms and second attention included, and half the feed-forward
/// features), and the all-reduced forward equals diffusers' on both ranks.
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
