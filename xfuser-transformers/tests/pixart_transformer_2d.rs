//! PixArtTransformer2DModel against diffusers: the fixtures in tests/fixtures/transformer/ are
//! tiny random-weight models saved by diffusers with its outputs on fixed inputs
//! (scripts/fixtures/transformer.py).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use common::{pixart_dir, TempModel, PIXART_CONDITIONING};
use xfuser_core::attention::{AttentionProcessor, SerialAttention};
use xfuser_core::backbone::{forward_in_two_streams, Backbone, BackboneInputs, ForwardContext};
use xfuser_core::registry::{self, Kind};
use xfuser_core::testing::{max_abs_diff, rel_l2, ForwardCase};
use xfuser_transformers::pixart_transformer_2d::CLASS_NAME;

fn load(model: &str) -> Box<dyn Backbone> {
    common::load(&pixart_dir(model))
}

fn goldens(model: &str, case: &str) -> ForwardCase {
    let file = pixart_dir(model).join(format!("io_{case}.safetensors"));
    common::forward_case(&file, &PIXART_CONDITIONING, None)
}

/// One test per (model folder, input case): the forward matches diffusers in f32.
macro_rules! parity {
    ($($name:ident: $model:literal, $case:literal;)*) => {$(
        #[test]
        fn $name() {
            let model = load($model);
            let io = goldens($model, $case);
            let out = model.forward(&io.inputs(), &ForwardContext::default()).unwrap();
            let err = rel_l2(&out, &io["output"]).unwrap();
            println!("{}/{}: rel L2 {err:.3e}", $model, $case);
            assert!(err <= 1e-5, "{}/{}: rel L2 {err:.3e} > 1e-5", $model, $case);
        }
    )*};
}

parity! {
    alpha_square: "alpha", "square";
    alpha_nonsquare_masked_batch: "alpha", "nonsquare_mask";
    sigma_masked_batch: "sigma", "batch_mask";
    sigma_nonsquare: "sigma", "nonsquare";
    transformer2d_alias_defaults: "alias", "square";
}

#[test]
fn split_forward_equals_whole() {
    for (model_name, case) in [("alpha", "nonsquare_mask"), ("sigma", "batch_mask")] {
        let io = goldens(model_name, case);
        common::assert_split_forward_equals_whole(
            load(model_name).as_ref(),
            &io.inputs(),
            model_name,
        );
    }
}

/// A batch of 2 on 2 or 3 threads runs as two concurrent halves; on 1 thread, or with a
/// batch of 1, as one stream. Both agree with each other and with diffusers.
#[test]
fn batch_streams_equal_one_stream() {
    let on_threads = |threads: usize, f: &(dyn Fn() -> Option<Tensor> + Sync)| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    };
    for (model_name, case) in [("alpha", "nonsquare_mask"), ("sigma", "batch_mask")] {
        let model = load(model_name);
        let io = goldens(model_name, case);
        let (inputs, ctx) = (io.inputs(), ForwardContext::default());
        assert_eq!(inputs.hidden_states.dim(0).unwrap(), 2, "a batch of 2");
        let streams = |threads| {
            on_threads(threads, &|| {
                forward_in_two_streams(model.as_ref(), &inputs, &ctx).unwrap()
            })
        };
        assert!(streams(1).is_none(), "one thread: one stream");
        let one = model.forward_one_stream(&inputs, &ctx).unwrap();
        for threads in [2, 3] {
            let two = streams(threads).expect("two streams");
            let err = rel_l2(&two, &one).unwrap();
            assert!(
                err <= 1e-6,
                "{model_name}/{case}, {threads} threads: {err:.3e}"
            );
            let err = rel_l2(&two, &io["output"]).unwrap();
            assert!(err <= 1e-5, "{model_name}/{case} vs diffusers: {err:.3e}");
        }
        let first = inputs.hidden_states.narrow(0, 0, 1).unwrap();
        let single = BackboneInputs {
            hidden_states: &first,
            ..inputs
        };
        assert!(
            on_threads(2, &|| forward_in_two_streams(model.as_ref(), &single, &ctx)
                .unwrap())
            .is_none()
        );
    }
}

/// Counts the self-attention calls it serves, and serves them serially.
#[derive(Default)]
struct CountingAttention {
    layers_seen: std::sync::Mutex<Vec<usize>>,
    calls: AtomicUsize,
}

impl AttentionProcessor for CountingAttention {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn self_attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> xfuser_core::Result<Tensor> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.layers_seen.lock().unwrap().push(layer);
        SerialAttention.self_attention(layer, q, k, v, scale)
    }
}

#[test]
fn self_attention_goes_through_the_context_processor() {
    let model = load("sigma");
    let io = goldens("sigma", "nonsquare");
    let counting = Arc::new(CountingAttention::default());
    let ctx = ForwardContext {
        attention: Some(counting.clone()),
        ..ForwardContext::default()
    };
    let out = model.forward(&io.inputs(), &ctx).unwrap();
    let serial = model
        .forward(&io.inputs(), &ForwardContext::default())
        .unwrap();
    assert_eq!(max_abs_diff(&out, &serial).unwrap(), 0.0);
    assert_eq!(counting.calls.load(Ordering::SeqCst), 2);
    assert_eq!(*counting.layers_seen.lock().unwrap(), vec![0, 1]);
}

#[test]
fn registry_has_pixart_and_the_transformer2d_alias() {
    assert!(registry::registered(Kind::Transformer).contains(&CLASS_NAME));
    let ada_single = serde_json::json!({"norm_type": "ada_norm_single"});
    let layer_norm = serde_json::json!({"norm_type": "layer_norm"});
    assert_eq!(
        registry::resolve_class_name(Kind::Transformer, "Transformer2DModel", &ada_single),
        CLASS_NAME
    );
    assert_eq!(
        registry::resolve_class_name(Kind::Transformer, "Transformer2DModel", &layer_norm),
        "Transformer2DModel"
    );
    let err = registry::transformer_entry("Transformer2DModel", &layer_norm)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(CLASS_NAME), "{err}");
}

#[test]
fn wrong_input_shapes_are_reported() {
    let model = load("sigma");
    let io = goldens("sigma", "nonsquare");
    let odd = Tensor::zeros(
        (1, 4, 7, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let err = model
        .forward(
            &BackboneInputs {
                hidden_states: &odd,
                ..io.inputs()
            },
            &ForwardContext::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiples of 2"), "{err}");
    let alpha = load("alpha");
    let io = goldens("alpha", "square");
    let without_resolution = ForwardCase::new(io.tensors.clone(), &PIXART_CONDITIONING[..2]);
    let err = alpha
        .forward(&without_resolution.inputs(), &ForwardContext::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("resolution and aspect_ratio"), "{err}");
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "error does not mention {part:?}: {err}");
    }
}

#[test]
fn config_errors_name_file_and_field() {
    let t = TempModel::new(&pixart_dir("sigma"), "cfg-class");
    t.edit_config(|c| {
        c.remove("_class_name");
    });
    assert_mentions(
        &t.load_error(),
        &["config.json", "`_class_name`", "missing"],
    );

    let t = TempModel::new(&pixart_dir("sigma"), "cfg-type");
    t.edit_config(|c| {
        c.insert("num_layers".into(), "two".into());
    });
    assert_mentions(
        &t.load_error(),
        &["config.json", "`num_layers`", "expected usize"],
    );

    let t = TempModel::new(&pixart_dir("sigma"), "cfg-null");
    t.edit_config(|c| {
        c.insert("num_attention_heads".into(), serde_json::Value::Null);
    });
    assert_mentions(
        &t.load_error(),
        &["config.json", "`num_attention_heads`", "null"],
    );

    let t = TempModel::new(&pixart_dir("sigma"), "cfg-norm");
    t.edit_config(|c| {
        c.insert("norm_type".into(), "ada_norm_continuous".into());
    });
    assert_mentions(
        &t.load_error(),
        &["config.json", "`norm_type`", "ada_norm_continuous"],
    );
}

#[test]
fn missing_optional_key_takes_diffusers_default() {
    // Without `num_layers` diffusers builds 28 blocks; the 2-block weights then lack block 2.
    let t = TempModel::new(&pixart_dir("sigma"), "cfg-default");
    t.edit_config(|c| {
        c.remove("num_layers");
    });
    assert_mentions(
        &t.load_error(),
        &[
            "diffusion_pytorch_model.safetensors",
            "transformer_blocks.2.",
        ],
    );
}

#[test]
fn weight_errors_name_file_tensor_and_shapes() {
    let t = TempModel::new(&pixart_dir("sigma"), "w-missing");
    t.edit_weights(|w| {
        w.remove("proj_out.weight");
    });
    assert_mentions(
        &t.load_error(),
        &[
            "diffusion_pytorch_model.safetensors",
            "proj_out.weight",
            "cannot find",
        ],
    );

    let t = TempModel::new(&pixart_dir("sigma"), "w-shape");
    t.edit_weights(|w| {
        let name = "transformer_blocks.1.attn2.to_k.weight";
        let bad = w[name].narrow(1, 0, 47).unwrap();
        w.insert(name.into(), bad);
    });
    assert_mentions(
        &t.load_error(),
        &[
            "diffusion_pytorch_model.safetensors",
            "transformer_blocks.1.attn2.to_k.weight",
            "expected: [48, 48]",
            "got: [48, 47]",
        ],
    );

    let t = TempModel::new(&pixart_dir("sigma"), "w-truncated");
    let bytes = std::fs::read(t.weights_path()).unwrap();
    std::fs::write(t.weights_path(), &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(
        &t.load_error(),
        &[
            "diffusion_pytorch_model.safetensors",
            "not a readable safetensors",
        ],
    );
}

#[test]
fn missing_weights_file_is_reported() {
    let t = TempModel::new(&pixart_dir("sigma"), "w-none");
    std::fs::remove_file(t.weights_path()).unwrap();
    assert_mentions(
        &t.load_error(),
        &["no weights found", "diffusion_pytorch_model"],
    );
}
