//! The `xfuser-dit` binary end to end, as a user runs it:
//! - `list` shows DiT registered next to the stock models: the plugin's registrations survived
//!   the link (a binary that never referenced the plugin crate would lose them);
//! - `generate` on the tiny DiT folders matches diffusers (latents ≤ 1e-4 rel L2, PNGs ≤ 2/255);
//! - every parallel method of the runtime (Ulysses, Ring, USP, CFG parallel, data parallel,
//!   PipeFusion with warm-up covering every step, and a hybrid) gives the serial run's latents
//!   (≤ 1e-5 rel L2) — none of it is code of this crate;
//! - bad requests fail with one `error:` line that says what to do.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use xfuser_core::testing::{
    images_max_abs_diff, load_goldens, max_abs_diff, read_case, rel_l2, TempDir,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir(model: &str) -> String {
    fixtures().join(model).to_string_lossy().into_owned()
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn assert_ok(&self) {
        assert_eq!(
            self.code,
            Some(0),
            "xfuser-dit failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
    }

    /// Failed with exactly one stderr line `error: …` holding every one of `needles`, and
    /// nothing on stdout; returns the line.
    #[track_caller]
    fn assert_error(&self, needles: &[&str]) -> String {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "expected a failure, got {:?}\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "stderr must be one line:\n{}", self.stderr);
        let line = lines[0];
        assert!(line.starts_with("error:"), "{line}");
        for needle in needles {
            assert!(line.contains(needle), "stderr lacks `{needle}`: {line}");
        }
        assert!(self.stdout.is_empty(), "stdout on failure: {}", self.stdout);
        line.to_string()
    }
}

/// The binary with a hermetic environment: offline, no Hub cache, no backtraces.
fn xfuser_dit(args: &[String]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xfuser-dit"));
    for var in [
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "RUST_LOG",
        "HF_HOME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_HUB_OFFLINE", "1").env(
        "HF_HUB_CACHE",
        std::env::temp_dir().join("xfuser-dit-test-no-such-hub-cache"),
    );
    let out = cmd.args(args).output().expect("spawn xfuser-dit");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    labels: Vec<String>,
    num_inference_steps: usize,
    guidance_scale: f64,
    seed: u64,
}

fn case(name: &str) -> Case {
    read_case(&fixtures().join("goldens/cases.json"), name).expect("case")
}

/// `generate` for a golden case (the model's default size), writing into `out`.
fn case_args(case: &Case, output_type: &str, out: &Path) -> Vec<String> {
    let mut args = strings(&["generate", "--model", &model_dir(&case.model)]);
    for label in &case.labels {
        args.extend(strings(&["--prompt", label]));
    }
    args.extend(strings(&[
        "--num-inference-steps",
        &case.num_inference_steps.to_string(),
        "--guidance-scale",
        &case.guidance_scale.to_string(),
        "--seed",
        &case.seed.to_string(),
        "--output-type",
        output_type,
        "--quiet",
        "--output-dir",
        &out.to_string_lossy(),
    ]));
    args
}

/// Runs `args` (an `--output-type latent` generate) and reads the one file it lists.
#[track_caller]
fn latents(args: &[String]) -> Tensor {
    let run = xfuser_dit(args);
    run.assert_ok();
    let listed: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(listed.len(), 1, "stdout: {}", run.stdout);
    assert!(listed[0].ends_with("_latents.safetensors"), "{}", listed[0]);
    let tensors = candle_core::safetensors::load(listed[0], &Device::Cpu).expect("latents file");
    tensors["latents"].clone()
}

// ---------------------------------------------------------------------------------------------
// The link: the plugin's registrations are in the binary

#[test]
fn list_shows_dit_next_to_the_stock_models() {
    let run = xfuser_dit(&strings(&["list"]));
    run.assert_ok();
    let lines: Vec<&str> = run.stdout.lines().map(str::trim).collect();
    for name in [
        "DiTPipeline",
        "DiTTransformer2DModel",
        "PixArtAlphaPipeline",
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
    ] {
        assert!(
            lines.contains(&name),
            "`{name}` not listed:\n{}",
            run.stdout
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("ulysses:")),
        "{}",
        run.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// Against diffusers

fn check_case_latents(name: &str) {
    let case = case(name);
    let out = TempDir::new(name);
    let ours = latents(&case_args(&case, "latent", out.path()));
    let golden = &load_goldens(&fixtures().join(format!("goldens/{name}.safetensors")))
        .expect("goldens")["latents"];
    let (err, worst) = (
        rel_l2(&ours, golden).unwrap(),
        max_abs_diff(&ours, golden).unwrap(),
    );
    println!("{name} via xfuser-dit: latents rel L2 {err:.3e}, max abs {worst:.3e}");
    assert!(err <= 1e-4, "{name}: latents rel L2 {err:.3e} > 1e-4");
}

#[test]
fn generate_small_cfg_latents_match_diffusers() {
    check_case_latents("small_cfg");
}

#[test]
fn generate_medium_cfg_batch2_latents_match_diffusers() {
    check_case_latents("medium_cfg_batch2");
}

#[test]
fn generate_small_nocfg_batch2_latents_match_diffusers() {
    check_case_latents("small_nocfg_batch2");
}

/// The PNGs `generate` writes by default, one per label, within 2/255 of diffusers' image.
#[test]
fn generate_writes_pngs_that_match_diffusers() {
    let name = "medium_cfg_batch2";
    let case = case(name);
    let out = TempDir::new("png");
    let run = xfuser_dit(&case_args(&case, "pil", out.path()));
    run.assert_ok();
    let paths: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(paths.len(), case.labels.len(), "stdout: {}", run.stdout);
    let images: Vec<xfuser_core::engine::RgbImage> = paths
        .iter()
        .map(|p| {
            let img = image::open(p).expect("png").to_rgb8();
            xfuser_core::engine::RgbImage {
                width: img.width() as usize,
                height: img.height() as usize,
                data: img.into_raw(),
            }
        })
        .collect();
    let golden = &load_goldens(&fixtures().join(format!("goldens/{name}.safetensors")))
        .expect("goldens")["image"];
    let worst = images_max_abs_diff(&images, golden).unwrap();
    println!("{name} PNGs: max diff {:.2}/255", worst * 255.0);
    assert!(
        worst <= 2.0 / 255.0,
        "PNGs differ by {:.2}/255",
        worst * 255.0
    );
}

// ---------------------------------------------------------------------------------------------
// The runtime's parallel methods on DiT: each equals the serial run

/// Runs case `name` serially and with each flag set of `configs`, comparing latents.
fn check_parallel_equals_serial(name: &str, configs: &[&[&str]]) {
    let case = case(name);
    let out = TempDir::new(&format!("{name}-serial"));
    let serial = latents(&case_args(&case, "latent", out.path()));
    for flags in configs {
        let out = TempDir::new(&format!("{name}-parallel"));
        let mut args = case_args(&case, "latent", out.path());
        args.extend(strings(flags));
        let parallel = latents(&args);
        let err = rel_l2(&parallel, &serial).unwrap();
        println!("{name} {flags:?}: latents vs serial rel L2 {err:.3e}");
        assert!(
            err <= 1e-5,
            "{name} {flags:?}: rel L2 vs serial {err:.3e} > 1e-5"
        );
    }
}

/// tiny-dit-m: 4 heads, 4 blocks, a 6×6 token grid, guidance on, two labels.
#[test]
fn medium_parallel_methods_equal_serial() {
    let steps = case("medium_cfg_batch2").num_inference_steps.to_string();
    check_parallel_equals_serial(
        "medium_cfg_batch2",
        &[
            &["--ulysses-degree", "2"],
            &["--ring-degree", "2"],
            &["--use-cfg-parallel"],
            &[
                "--pipefusion-parallel-degree",
                "2",
                "--warmup-steps",
                &steps,
            ],
            &["--ulysses-degree", "2", "--ring-degree", "2"],
            &["--data-parallel-degree", "2"],
            &["--use-cfg-parallel", "--ulysses-degree", "2"],
        ],
    );
}

/// Tensor parallelism on tiny-dit-m (4 heads: 2 per tp rank, 1 per Ulysses rank inside it),
/// alone and with CFG parallelism, Ulysses and PipeFusion (every step a warmup step).
#[test]
fn medium_tensor_parallel_hybrids_equal_serial() {
    let steps = case("medium_cfg_batch2").num_inference_steps.to_string();
    check_parallel_equals_serial(
        "medium_cfg_batch2",
        &[
            &["--tensor-parallel-degree", "2"],
            &["--tensor-parallel-degree", "2", "--use-cfg-parallel"],
            &["--tensor-parallel-degree", "2", "--ulysses-degree", "2"],
            &[
                "--tensor-parallel-degree",
                "2",
                "--pipefusion-parallel-degree",
                "2",
                "--warmup-steps",
                &steps,
            ],
        ],
    );
}

/// tiny-dit: 2 heads, 2 blocks (one per PipeFusion stage), a 4×4 grid; without guidance.
#[test]
fn small_parallel_methods_equal_serial() {
    let steps = case("small_nocfg_batch2").num_inference_steps.to_string();
    check_parallel_equals_serial(
        "small_nocfg_batch2",
        &[
            &["--ulysses-degree", "2"],
            &["--ring-degree", "2"],
            &[
                "--pipefusion-parallel-degree",
                "2",
                "--warmup-steps",
                &steps,
            ],
        ],
    );
}

/// A size other than the trained one, not square, with an odd number of token rows (3×5
/// patches): diffusers' DiT transformer cannot unpatchify it, this one can, and the parallel
/// runs still equal the serial one (Ring pads the rows it splits unevenly).
#[test]
fn non_square_size_parallel_equals_serial() {
    let run = |extra: &[&str]| {
        let out = TempDir::new("nonsquare");
        let mut args = quick(
            "tiny-dit",
            &["--prompt", "cock", "--height", "48", "--width", "80"],
            out.path(),
        );
        args.extend(strings(&[
            "--output-type",
            "latent",
            "--guidance-scale",
            "2.5",
        ]));
        args.extend(strings(extra));
        latents(&args)
    };
    let serial = run(&[]);
    assert_eq!(serial.dims(), &[1, 4, 6, 10]);
    for flags in [
        &["--ring-degree", "2"][..],
        &["--ulysses-degree", "2", "--use-cfg-parallel"][..],
        &["--pipefusion-parallel-degree", "2", "--warmup-steps", "2"][..],
    ] {
        let err = rel_l2(&run(flags), &serial).unwrap();
        println!("48x80 {flags:?}: latents vs serial rel L2 {err:.3e}");
        assert!(
            err <= 1e-5,
            "48x80 {flags:?}: rel L2 vs serial {err:.3e} > 1e-5"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals

fn quick(model: &str, extra: &[&str], out: &Path) -> Vec<String> {
    let mut args = strings(&[
        "generate",
        "--model",
        &model_dir(model),
        "--num-inference-steps",
        "2",
        "--quiet",
        "--output-dir",
        &out.to_string_lossy(),
    ]);
    args.extend(strings(extra));
    args
}

#[track_caller]
fn refused(extra: &[&str], needles: &[&str]) -> String {
    let out = TempDir::new("refused");
    let line = xfuser_dit(&quick("tiny-dit", extra, out.path())).assert_error(needles);
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    line
}

#[test]
fn an_unknown_label_lists_the_closest_valid_ones() {
    let line = refused(
        &["--prompt", "golden retriever"],
        &["--prompt \"golden retriever\"", "id2label", "closest:"],
    );
    // A few names, not the whole table.
    assert!(line.matches('"').count() <= 2 + 2 * 5, "{line}");
    refused(
        &["--prompt", "goldfsh"],
        &["--prompt \"goldfsh\"", "closest: \"goldfish\""],
    );
}

#[test]
fn a_negative_prompt_is_refused() {
    refused(
        &["--prompt", "hen", "--negative-prompt", "blurry"],
        &["--negative-prompt", "null class"],
    );
}

#[test]
fn a_max_sequence_length_is_refused() {
    refused(
        &["--prompt", "hen", "--max-sequence-length", "8"],
        &["--max-sequence-length", "no text encoder"],
    );
}

#[test]
fn cfg_parallel_without_guidance_is_refused() {
    refused(
        &[
            "--prompt",
            "hen",
            "--guidance-scale",
            "1",
            "--use-cfg-parallel",
        ],
        &["--guidance-scale"],
    );
}

#[test]
fn ulysses_must_divide_the_heads() {
    refused(
        &["--prompt", "hen", "--ulysses-degree", "4"],
        &["--ulysses-degree"],
    );
}

/// Tensor parallelism gives every rank whole heads: degree 3 on tiny-dit's 2 heads is refused,
/// naming the flag and the heads.
#[test]
fn a_tensor_parallel_degree_must_divide_the_heads() {
    refused(
        &["--prompt", "hen", "--tensor-parallel-degree", "3"],
        &["--tensor-parallel-degree 3", "2 attention heads"],
    );
}
