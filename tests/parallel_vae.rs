//! `--use-parallel-vae` through the pipelines: with it every rank of a parallel run takes part
//! in the VAE decode (rows split over the world), and the images must equal those of the
//! serial run of the same request (at most 1/255 per pixel), for CFG, Ulysses, data parallel
//! and PipeFusion × Ulysses runs, square and non-square sizes, latent heights the rank count
//! does not divide, resolution binning, and the PixArt, SD3 and Flux pipelines. Then the
//! refusal of more ranks than latent rows.

use std::path::PathBuf;
use std::time::Duration;

use xfuser::core::distributed::CommOp;
use xfuser::core::engine::{EngineConfig, InputConfig, OutputType, ParallelConfig, PipelineOutput};
use xfuser::core::testing::{fixtures_dir, rel_l2};
use xfuser::pipelines::xFuserPipeline;

fn model_dir(model: &str) -> PathBuf {
    match model {
        "tiny-sd3" => fixtures_dir().join("sd3/tiny-sd3"),
        "tiny-flux-dev" => fixtures_dir().join("flux/tiny-flux-dev"),
        _ => fixtures_dir().join("pipelines").join(model),
    }
}

fn input(prompts: &[&str], height: usize, width: usize, binning: bool) -> InputConfig {
    InputConfig {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: "dark".into(),
        height: Some(height),
        width: Some(width),
        num_inference_steps: 3,
        guidance_scale: 4.5,
        seed: 5,
        output_type: OutputType::Pil,
        max_sequence_length: Some(16),
        use_resolution_binning: binning,
        ..Default::default()
    }
}

fn run(
    model: &str,
    parallel: ParallelConfig,
    parallel_vae: bool,
    input: &InputConfig,
) -> xfuser::core::Result<PipelineOutput> {
    let mut engine = EngineConfig::new(model_dir(model).to_string_lossy());
    engine.parallel = parallel;
    engine.runtime.use_parallel_vae = parallel_vae;
    engine.runtime.comm_timeout = Duration::from_secs(120);
    let pipeline = xFuserPipeline::from_pretrained(&engine)?;
    pipeline.generate(input, &mut |_, _| {})
}

fn degrees(dp: usize, cfg: bool, ulysses: usize, pp: usize) -> ParallelConfig {
    ParallelConfig {
        data_parallel_degree: dp,
        use_cfg_parallel: cfg,
        ulysses_degree: ulysses,
        pipefusion_parallel_degree: pp,
        // Every step a warmup step: PipeFusion then computes exactly the serial latents, so
        // the images can be compared with the serial ones.
        warmup_steps: 3,
        ..Default::default()
    }
}

fn check_against_serial(model: &str, parallel: ParallelConfig, input: InputConfig) {
    let world = parallel.world_size();
    let serial = run(model, ParallelConfig::default(), false, &input).expect("serial run");
    let ours = run(model, parallel, true, &input).expect("parallel run with --use-parallel-vae");
    let err = rel_l2(&ours.latents, &serial.latents).unwrap();
    assert!(err <= 1e-5, "latents vs serial rel L2 {err:.3e}");
    assert_eq!(
        ours.images.len(),
        serial.images.len(),
        "one image per request image"
    );
    // The decode ran on the world: its convolutions swapped halo rows between ranks.
    let stats = ours.comm_stats.expect("parallel runs report their traffic");
    let halo = stats.sum(|k| k.group.starts_with("world") && k.op == CommOp::Send);
    assert!(halo.calls > 0, "no halo rows were sent on the world group");
    let mut worst = 0;
    for (a, b) in ours.images.iter().zip(&serial.images) {
        assert_eq!((a.width, a.height), (b.width, b.height));
        let diff = a.data.iter().zip(&b.data).map(|(x, y)| x.abs_diff(*y));
        worst = worst.max(diff.max().unwrap_or(0));
    }
    println!(
        "{model}, world {world}, {}x{}: latents rel L2 {err:.3e}, max pixel diff {worst}/255",
        input.height.unwrap_or(0),
        input.width.unwrap_or(0)
    );
    assert!(worst <= 1, "pixels differ by {worst}/255");
}

/// One line per configuration: name, model, (dp, cfg parallel, ulysses, pipefusion), prompts,
/// height, width, resolution binning.
macro_rules! parallel_vae_matrix {
    ($($name:ident: $model:literal, ($dp:expr, $cfg:expr, $u:expr, $pp:expr), $prompts:expr, $h:expr, $w:expr, $bin:expr;)*) => {$(
        #[test]
        fn $name() {
            check_against_serial($model, degrees($dp, $cfg, $u, $pp), input(&$prompts, $h, $w, $bin));
        }
    )*};
}

const ONE: [&str; 1] = ["a red cat sitting on the moon"];
const THREE: [&str; 3] = [
    "a red cat sitting on the moon",
    "a blue bird over the river",
    "a green house",
];

parallel_vae_matrix! {
    // 8 latent rows, 4 + 4.
    ulysses2_square: "tiny-pixart-alpha", (1, false, 2, 1), ONE, 64, 64, false;
    // 6 latent rows on 2 ranks, non-square.
    cfg2_non_square: "tiny-pixart-alpha", (1, true, 1, 1), ONE, 48, 96, false;
    // Three images over two data-parallel groups (2 + 1), then decoded by all four ranks.
    dp2_cfg2_three_images: "tiny-pixart-alpha", (2, true, 1, 1), THREE, 64, 64, false;
    // 6 latent rows on 4 ranks: 2 + 2 + 1 + 1.
    ulysses4_uneven_rows: "tiny-pixart-sigma", (1, false, 4, 1), ONE, 48, 64, false;
    // The latents live on the last stage only.
    pipefusion2_ulysses2: "tiny-pixart-sigma", (1, false, 2, 2), ONE, 64, 96, false;
    // Generated at the binned size, resized back to 96 x 64 on the lead rank.
    cfg2_ulysses2_binning: "tiny-pixart-alpha", (1, true, 2, 1), ONE, 96, 64, true;
    sd3_ulysses2: "tiny-sd3", (1, false, 2, 1), ONE, 64, 48, false;
    flux_cfg_free_ulysses2: "tiny-flux-dev", (1, false, 2, 1), ONE, 48, 64, false;
}

#[test]
fn the_flag_with_latent_output_returns_the_same_latents() {
    let mut request = input(&ONE, 64, 64, false);
    request.output_type = OutputType::Latent;
    let off = run(
        "tiny-pixart-alpha",
        degrees(1, false, 2, 1),
        false,
        &request,
    )
    .unwrap();
    let on = run("tiny-pixart-alpha", degrees(1, false, 2, 1), true, &request).unwrap();
    assert!(on.images.is_empty());
    assert_eq!(rel_l2(&on.latents, &off.latents).unwrap(), 0.0);
}

#[test]
fn more_ranks_than_latent_rows_are_refused_before_any_work() {
    // 16 px: 2 latent rows for 4 ranks.
    let request = input(&ONE, 16, 64, false);
    let started = std::time::Instant::now();
    let err = run("tiny-pixart-sigma", degrees(1, false, 4, 1), true, &request)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--use-parallel-vae on 4 ranks") && err.contains("2 rows"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}
