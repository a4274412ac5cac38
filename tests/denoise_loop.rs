//! The PixArt denoising loop (transformer + scheduler + CFG) against diffusers, given the prompt
//! embeddings and initial noise diffusers used: final latents within rel-L2 1e-4.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::Tensor;
use xfuser::core::backbone::{
    names, Backbone, BackboneInfo, BackboneInputs, BlockState, Conditioning, ForwardContext,
};
use xfuser::core::registry::{load_scheduler, load_transformer, LoadOptions};
use xfuser::core::testing::{fixtures_dir, load_goldens, rel_l2};
use xfuser::core::Result;
use xfuser::pipelines::denoise::{denoise, Guidance};

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    num_inference_steps: usize,
    guidance_scale: f64,
}

fn pipelines_dir() -> PathBuf {
    fixtures_dir().join("pipelines")
}

fn case(name: &str) -> Case {
    let file = pipelines_dir().join("goldens/cases.json");
    let all: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("cases.json")).expect("json");
    serde_json::from_value(all[name].clone()).expect("case fields")
}

fn run_loop(name: &str) -> (Tensor, Tensor, Vec<usize>) {
    run_loop_on(name, rayon::current_num_threads())
}

/// The loop on a pool of `threads`: with CFG and 2 or more threads the two halves run as
/// concurrent streams, with 1 as one doubled batch (denoise's `CfgStreams`).
fn run_loop_on(name: &str, threads: usize) -> (Tensor, Tensor, Vec<usize>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    pool.install(|| run_loop_here(name))
}

fn run_loop_here(name: &str) -> (Tensor, Tensor, Vec<usize>) {
    let case = case(name);
    let model = pipelines_dir().join(&case.model);
    let golden = load_goldens(&pipelines_dir().join(format!("goldens/{name}.safetensors")))
        .expect("goldens");
    let backbone = Recording {
        inner: load_transformer(&model.join("transformer"), &LoadOptions::default())
            .expect("transformer"),
        batches: Mutex::new(Vec::new()),
    };
    let mut scheduler =
        load_scheduler(&model.join("scheduler/scheduler_config.json")).expect("scheduler");
    scheduler
        .set_timesteps(case.num_inference_steps)
        .expect("set_timesteps");
    let expected_timesteps: Vec<f64> = golden["timesteps"].to_vec1().expect("timesteps");
    assert_eq!(scheduler.timesteps(), expected_timesteps.as_slice());

    let text = |prefix: &str| {
        Some(
            Conditioning::new()
                .with(
                    names::ENCODER_HIDDEN_STATES,
                    golden.get(&format!("{prefix}prompt_embeds"))?.clone(),
                )
                .with(
                    names::ENCODER_ATTENTION_MASK,
                    golden
                        .get(&format!("{prefix}prompt_attention_mask"))?
                        .clone(),
                ),
        )
    };
    let guidance = Guidance {
        positive: text("").expect("prompt embeddings"),
        negative: if case.guidance_scale > 1.0 {
            Some(text("negative_").expect("negative prompt embeddings"))
        } else {
            None
        },
        guidance_scale: case.guidance_scale,
    };
    let latents = (golden["initial_latents"].clone() * scheduler.init_noise_sigma()).unwrap();
    let mut steps = 0;
    let out = denoise(
        &backbone,
        scheduler.as_ref(),
        latents,
        &guidance,
        &ForwardContext::default(),
        None,
        None,
        &mut |_, _| {
            steps += 1;
            Ok(())
        },
    )
    .expect("denoise");
    assert_eq!(steps, case.num_inference_steps);
    let batches = backbone.batches.into_inner().unwrap();
    (out, golden["latents"].clone(), batches)
}

/// A backbone that records the batch of every forward it runs.
struct Recording {
    inner: Box<dyn Backbone>,
    batches: Mutex<Vec<usize>>,
}

impl Backbone for Recording {
    fn info(&self) -> &BackboneInfo {
        self.inner.info()
    }

    fn embed(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<BlockState> {
        self.inner.embed(inputs, ctx)
    }

    fn blocks(
        &self,
        state: BlockState,
        layers: Range<usize>,
        ctx: &ForwardContext,
    ) -> Result<BlockState> {
        self.inner.blocks(state, layers, ctx)
    }

    fn head(&self, state: BlockState, ctx: &ForwardContext) -> Result<Tensor> {
        self.inner.head(state, ctx)
    }

    fn forward(&self, inputs: &BackboneInputs, ctx: &ForwardContext) -> Result<Tensor> {
        self.batches
            .lock()
            .unwrap()
            .push(inputs.hidden_states.dim(0)?);
        self.inner.forward(inputs, ctx)
    }
}

macro_rules! loop_parity {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let (ours, reference, _) = run_loop(stringify!($name));
            let err = rel_l2(&ours, &reference).unwrap();
            println!("{}: latents rel L2 = {err:.3e}", stringify!($name));
            assert!(err <= 1e-4, "{}: rel L2 {err:.3e} > 1e-4", stringify!($name));
        }
    )*};
}

loop_parity!(
    alpha_square_cfg,
    alpha_nonsquare_nocfg,
    sigma_square_cfg_batch2,
    sigma_nonsquare_cfg,
);

/// Serial CFG as one doubled batch (1 thread) and as two concurrent half-batch streams (2 and 3
/// threads, the second split unevenly): each against diffusers, and the two ways against each
/// other.
#[test]
fn cfg_streams_and_doubled_batch_agree() {
    let name = "sigma_square_cfg_batch2";
    let steps = case(name).num_inference_steps;
    let (doubled, reference, batches) = run_loop_on(name, 1);
    // Two prompts: one forward of 4 per step.
    assert_eq!(batches, vec![4; steps]);
    let err = rel_l2(&doubled, &reference).unwrap();
    assert!(
        err <= 1e-4,
        "doubled batch vs diffusers: rel L2 {err:.3e} > 1e-4"
    );
    for threads in [2, 3] {
        let (streams, _, batches) = run_loop_on(name, threads);
        // Two forwards of 2 per step, one per CFG side.
        assert_eq!(batches, vec![2; 2 * steps], "{threads} threads");
        let err = rel_l2(&streams, &doubled).unwrap();
        println!("{threads} threads: streams vs doubled batch rel L2 = {err:.3e}");
        assert!(
            err <= 1e-5,
            "streams vs doubled batch: rel L2 {err:.3e} > 1e-5"
        );
        let err = rel_l2(&streams, &reference).unwrap();
        assert!(err <= 1e-4, "streams vs diffusers: rel L2 {err:.3e} > 1e-4");
    }
}
