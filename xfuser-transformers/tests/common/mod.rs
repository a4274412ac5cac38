//! What the backbone tests share: the fixture folders and cases, loading, a rank mesh and the
//! sequence-parallel split of a latent, the sp forward on every rank of the local backend,
//! the checks every backbone passes alike, and a fixture copy to break.

// Each test binary uses its own part of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use xfuser_core::backbone::{Backbone, BackboneInputs, ForwardContext, SpContext};
use xfuser_core::distributed::{
    launch_local, InputMetadata, LaunchOptions, RankContext, RankMesh, RuntimeState,
};
use xfuser_core::engine::ParallelConfig;
use xfuser_core::registry::{self, LoadOptions};
use xfuser_core::testing::{fixtures_dir, load_goldens, max_abs_diff, rel_l2, ForwardCase};

/// A PixArt fixture model folder (tests/fixtures/transformer/, scripts/fixtures/transformer.py).
pub fn pixart_dir(model: &str) -> PathBuf {
    fixtures_dir().join("transformer").join(model)
}

/// The SD3 fixtures (scripts/fixtures/sd3.py): a model folder and a `{model}.safetensors`
/// forward per model.
pub fn sd3_transformer_dir() -> PathBuf {
    fixtures_dir().join("sd3").join("transformer")
}

/// The conditioning a PixArt forward reads.
pub const PIXART_CONDITIONING: [&str; 4] = [
    "encoder_hidden_states",
    "encoder_attention_mask",
    "resolution",
    "aspect_ratio",
];

/// The conditioning an SD3 forward reads.
pub const SD3_CONDITIONING: [&str; 2] = ["encoder_hidden_states", "pooled_projections"];

pub fn load(dir: &Path) -> Box<dyn Backbone> {
    load_with(dir, &LoadOptions::default())
}

pub fn load_with(dir: &Path, options: &LoadOptions) -> Box<dyn Backbone> {
    registry::load_transformer(dir, options).unwrap()
}

/// The fixture forward saved in `file`, reading `conditioning`; `latent_rows` crops the latent
/// (to make a token-row count that an sp degree does not divide).
pub fn forward_case(file: &Path, conditioning: &[&str], latent_rows: Option<usize>) -> ForwardCase {
    let mut io = load_goldens(file).unwrap();
    if let Some(rows) = latent_rows {
        let cropped = io["hidden_states"].narrow(2, 0, rows).unwrap();
        io.insert("hidden_states".into(), cropped);
    }
    ForwardCase::new(io, conditioning)
}

pub fn mesh(ulysses: usize, ring: usize) -> RankMesh {
    RankMesh::new(&ParallelConfig {
        ulysses_degree: ulysses,
        ring_degree: ring,
        ..Default::default()
    })
    .unwrap()
}

/// The split of the latent over the sp ranks of `mesh`, as the runtime state computes it.
pub fn sp_metadata(model: &dyn Backbone, mesh: &RankMesh, latent: &Tensor) -> InputMetadata {
    let (batch, _, h, w) = latent.dims4().unwrap();
    let mut state = RuntimeState::new(mesh, model.info().patch_size, 8, None);
    state
        .set_input_parameters(h * 8, w * 8, batch, 1)
        .unwrap()
        .clone()
}

/// Runs `run` on every rank of `mesh` (local backend) with a forward context for the split
/// `meta`: its sequence-parallel `processor`, or none at all.
pub fn on_sp_ranks<T: Send>(
    mesh: &RankMesh,
    options: &LaunchOptions,
    meta: &InputMetadata,
    processor: Option<&str>,
    run: impl Fn(&RankContext, &ForwardContext) -> xfuser_core::Result<T> + Send + Sync,
) -> xfuser_core::Result<Vec<T>> {
    launch_local(mesh, options, |ctx| {
        let sp = SpContext::from_rank(&ctx, meta.full.clone())?;
        let fctx = match processor {
            Some(processor) => ForwardContext::sequence_parallel(processor, sp)?,
            None => ForwardContext {
                attention: None,
                sp: Some(sp),
                tp: None,
            },
        };
        run(&ctx, &fctx)
    })
}

/// A sequence-parallel forward run on every rank of a mesh by [`sp_forward`].
pub struct SpForward<T> {
    /// The split of the latent, as the runtime state computes it.
    pub meta: InputMetadata,
    /// Each rank's output, and what `per_rank` read of its context.
    pub ranks: Vec<(Tensor, T)>,
    /// The largest rel L2 of a rank's output vs the serial forward.
    pub worst: f64,
}

/// Runs `model`'s forward with the sp `processor` on every rank of a U×R mesh (local
/// backend), once the split is checked to pad a rank or not (`expect_padding`); checks every
/// rank's output against the serial forward (rel L2 ≤ 1e-5) and against rank 0's (every rank
/// gathers the same bits). `per_rank` reads what it needs of a rank's context after its
/// forward.
pub fn sp_forward<T: Send>(
    model: &dyn Backbone,
    inputs: &BackboneInputs,
    (u, r): (usize, usize),
    processor: &str,
    expect_padding: bool,
    label: &str,
    per_rank: impl Fn(&RankContext) -> T + Send + Sync,
) -> SpForward<T> {
    let serial = model.forward(inputs, &ForwardContext::default()).unwrap();
    let mesh = mesh(u, r);
    let meta = sp_metadata(model, &mesh, inputs.hidden_states);
    let padded = meta.full.slices.iter().any(|s| s.padding() > 0);
    assert_eq!(padded, expect_padding, "padding of {:?}", meta.full.slices);

    let options = LaunchOptions::default();
    let ranks = on_sp_ranks(&mesh, &options, &meta, Some(processor), |ctx, fctx| {
        Ok((model.forward(inputs, fctx)?, per_rank(ctx)))
    })
    .unwrap();

    let mut worst = 0f64;
    for (rank, (out, _)) in ranks.iter().enumerate() {
        let err = rel_l2(out, &serial).unwrap();
        worst = worst.max(err);
        assert!(err <= 1e-5, "{label}: rank {rank} rel L2 {err:.3e} > 1e-5");
        assert_eq!(max_abs_diff(out, &ranks[0].0).unwrap(), 0.0, "{label}");
    }
    SpForward { meta, ranks, worst }
}

/// A Ulysses degree of 4 cannot split the fixtures' 2 heads: the sp forward fails before
/// any communication.
pub fn assert_ulysses_degree_refused(model: &dyn Backbone, inputs: &BackboneInputs) {
    let mesh = mesh(4, 1);
    let meta = sp_metadata(model, &mesh, inputs.hidden_states);
    let options = LaunchOptions::default();
    let err = on_sp_ranks(&mesh, &options, &meta, Some("ulysses"), |_, fctx| {
        model.forward(inputs, fctx)
    })
    .expect_err("ulysses 4 cannot split 2 heads")
    .to_string();
    assert!(
        err.contains("--ulysses-degree 4 does not divide the 2 attention heads"),
        "{err}"
    );
    assert!(
        options.stats.snapshot().is_empty(),
        "no communication may happen: {:?}",
        options.stats.snapshot()
    );
}

/// An sp context on 2 ranks without a parallel attention processor is refused.
pub fn assert_sp_without_processor_refused(model: &dyn Backbone, inputs: &BackboneInputs) {
    let mesh = mesh(2, 1);
    let meta = sp_metadata(model, &mesh, inputs.hidden_states);
    let err = on_sp_ranks(&mesh, &LaunchOptions::default(), &meta, None, |_, fctx| {
        model.forward(inputs, fctx)
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("parallel attention processor"), "{err}");
}

/// embed, the blocks split in two at every block, head: the same bits as the whole forward.
pub fn assert_split_forward_equals_whole(
    model: &dyn Backbone,
    inputs: &BackboneInputs,
    label: &str,
) {
    let ctx = ForwardContext::default();
    let whole = model.forward_one_stream(inputs, &ctx).unwrap();
    let n = model.info().num_layers;
    for k in 0..=n {
        let state = model.embed(inputs, &ctx).unwrap();
        let state = model.blocks(state, 0..k, &ctx).unwrap();
        let state = model.blocks(state, k..n, &ctx).unwrap();
        let split = model.head(state, &ctx).unwrap();
        assert_eq!(
            max_abs_diff(&split, &whole).unwrap(),
            0.0,
            "{label}: split at {k}"
        );
    }
}

/// A copy of a fixture model folder (its config and weights) in the temp dir, removed on drop.
pub struct TempModel {
    pub dir: PathBuf,
}

impl TempModel {
    /// `tag` names the copy (unique within a test binary).
    pub fn new(model_dir: &Path, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "xfuser-transformer-test-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(model_dir.join(name), dir.join(name)).unwrap();
        }
        Self { dir }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join("diffusion_pytorch_model.safetensors")
    }

    pub fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
        let text = std::fs::read_to_string(self.config_path()).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(value.as_object_mut().unwrap());
        std::fs::write(self.config_path(), value.to_string()).unwrap();
    }

    pub fn edit_weights(&self, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let mut tensors = load_goldens(&self.weights_path()).unwrap();
        edit(&mut tensors);
        candle_core::safetensors::save(&tensors, self.weights_path()).unwrap();
    }

    /// The error of loading the copy, which must fail.
    pub fn load_error(&self) -> String {
        match registry::load_transformer(&self.dir, &LoadOptions::default()) {
            Ok(_) => panic!("loading {} should fail", self.dir.display()),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
