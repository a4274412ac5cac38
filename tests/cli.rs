//! The `xfuser` binary end to end: `generate` on the tiny fixture pipelines against the
//! diffusers goldens (latents and PNGs), the bundled model, Hub ids resolved in a fake Hugging
//! Face cache, `list`, and bad input — each refused with a one-line `error:` message that names
//! the problem, leaving no file behind.
//!
//! Every run gets `HF_HUB_OFFLINE=1` and an empty `HF_HUB_CACHE` unless a test sets its own, so
//! nothing here touches the network or the user's cache, and `RUST_BACKTRACE` is removed so
//! messages do not depend on the caller's environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use xfuser::core::testing::{copy_dir, fixtures_dir, load_goldens, max_abs_diff, rel_l2, TempDir};

const STEM: &str = "result_dp1_cfg1_ulysses1_ring1_tp1_pp1_patch1";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn pipelines_dir() -> PathBuf {
    fixtures_dir().join("pipelines")
}

fn model_dir(model: &str) -> PathBuf {
    pipelines_dir().join(model)
}

/// What a run of the binary did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// The written files, one per stdout line.
    fn listed(&self) -> Vec<PathBuf> {
        self.stdout.lines().map(PathBuf::from).collect()
    }

    #[track_caller]
    fn assert_ok(&self) {
        assert!(
            self.ok(),
            "xfuser failed ({:?}):\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout,
            self.stderr
        );
    }

    /// Failed with exit code ≠ 0 and exactly one stderr line `error: …` holding every one of
    /// `needles`; returns that line.
    #[track_caller]
    fn assert_error(&self, needles: &[&str]) -> String {
        assert!(
            !self.ok() && self.code.is_some(),
            "expected a failure, got {:?}\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "stderr must be one line, got:\n{}",
            self.stderr
        );
        let line = lines[0];
        assert!(line.starts_with("error:"), "stderr: {line}");
        for needle in needles {
            assert!(line.contains(needle), "stderr lacks `{needle}`: {line}");
        }
        assert!(self.stdout.is_empty(), "stdout on failure: {}", self.stdout);
        line.to_string()
    }
}

/// The binary with a hermetic environment: offline, an empty private Hub cache, no backtraces.
fn xfuser() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xfuser"));
    for var in [
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "RUST_LOG",
        "HF_HOME",
        "HF_HUB_CACHE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd.env(
        "HF_HUB_CACHE",
        std::env::temp_dir().join("xfuser-cli-test-no-such-hub-cache"),
    );
    cmd
}

fn run(cmd: &mut Command) -> Run {
    let out = cmd.output().expect("spawn xfuser");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every entry of `dir` (hidden ones included), sorted; empty when `dir` does not exist.
fn entries(dir: &Path) -> Vec<String> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = read
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[track_caller]
fn assert_no_files(dir: &Path) {
    let left = entries(dir);
    assert!(left.is_empty(), "{} holds {left:?}", dir.display());
}

/// A golden case of `tests/fixtures/pipelines/goldens/cases.json`.
#[derive(serde::Deserialize)]
struct Case {
    model: String,
    prompts: Vec<String>,
    negative_prompt: String,
    height: usize,
    width: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
    seed: u64,
    max_sequence_length: usize,
    use_resolution_binning: bool,
}

fn case(name: &str) -> Case {
    let file = pipelines_dir().join("goldens/cases.json");
    let all: HashMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("cases.json")).expect("json");
    serde_json::from_value(all[name].clone()).expect("case fields")
}

fn goldens(name: &str) -> HashMap<String, Tensor> {
    load_goldens(&pipelines_dir().join(format!("goldens/{name}.safetensors"))).expect("goldens")
}

/// The `generate` arguments of a case, dash spellings, one `--prompt` flag per prompt.
fn case_args(case: &Case, output_type: &str, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        model_dir(&case.model).to_string_lossy().into_owned(),
    ];
    for p in &case.prompts {
        args.extend(["--prompt".into(), p.clone()]);
    }
    args.extend([
        "--negative-prompt".into(),
        case.negative_prompt.clone(),
        "--seed".into(),
        case.seed.to_string(),
        "--output-type".into(),
        output_type.into(),
        "--height".into(),
        case.height.to_string(),
        "--width".into(),
        case.width.to_string(),
        "--num-inference-steps".into(),
        case.num_inference_steps.to_string(),
        "--guidance-scale".into(),
        case.guidance_scale.to_string(),
        "--max-sequence-length".into(),
        case.max_sequence_length.to_string(),
        "--quiet".into(),
        "--output-dir".into(),
        out.to_string_lossy().into_owned(),
    ]);
    if !case.use_resolution_binning {
        args.push("--no-use-resolution-binning".into());
    }
    args
}

/// Reads the `latents` tensor of a file the CLI wrote.
fn read_latents(path: &Path) -> Tensor {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).expect("read latents");
    assert_eq!(tensors.len(), 1, "{}: {:?}", path.display(), tensors.keys());
    tensors["latents"].clone()
}

/// Runs `args` and checks it wrote exactly `{model}_{STEM}_latents.safetensors` into `out`,
/// listed on stdout; returns the latents.
#[track_caller]
fn latents_run(args: &[String], out: &Path, model: &str) -> Tensor {
    let r = run(xfuser().args(args));
    r.assert_ok();
    let name = format!("{model}_{STEM}_latents.safetensors");
    assert_eq!(r.listed(), vec![out.join(&name)], "stdout: {}", r.stdout);
    assert_eq!(entries(out), vec![name.clone()]);
    read_latents(&out.join(name))
}

#[track_caller]
fn assert_latents_match(name: &str, ours: &Tensor, golden: &Tensor) {
    assert_eq!(ours.dims(), golden.dims(), "{name}: latents shape");
    let err = rel_l2(ours, golden).unwrap();
    assert!(err <= 1e-4, "{name}: latents rel L2 {err:.3e} > 1e-4");
}

/// The golden case `name` through the CLI with `--output-type latent`.
fn check_case_latents(name: &str) {
    let case = case(name);
    let out = TempDir::new(&format!("{name}-latent"));
    let latents = latents_run(
        &case_args(&case, "latent", out.path()),
        out.path(),
        &case.model,
    );
    let golden = goldens(name);
    let (b, c, h, w) = latents.dims4().unwrap();
    assert_eq!(b, case.prompts.len());
    assert_eq!(c, 4);
    if !case.use_resolution_binning {
        assert_eq!((h * 8, w * 8), (case.height, case.width));
    }
    assert_latents_match(name, &latents, &golden["latents"]);
}

/// The golden case `name` through the CLI with the default `--output-type pil`: one PNG per
/// image, each within 2/255 of diffusers' image.
fn check_case_images(name: &str) {
    let case = case(name);
    let out = TempDir::new(&format!("{name}-pil"));
    let mut args = case_args(&case, "pil", out.path());
    // pil is the default: leave the flag out.
    let at = args.iter().position(|a| a == "--output-type").unwrap();
    args.drain(at..at + 2);
    let r = run(xfuser().args(&args));
    r.assert_ok();

    let reference = &goldens(name)["image"]; // (B, H, W, 3) in [0, 1]
    let (b, h, w, _) = reference.dims4().unwrap();
    let names: Vec<String> = (0..b)
        .map(|i| format!("{}_{STEM}_{i}.png", case.model))
        .collect();
    let paths: Vec<PathBuf> = names.iter().map(|n| out.join(n)).collect();
    assert_eq!(r.listed(), paths, "stdout: {}", r.stdout);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(entries(out.path()), sorted);

    let mut pixels = Vec::new();
    for path in &paths {
        let img = image::open(path).expect("decode png");
        assert_eq!(img.color(), image::ColorType::Rgb8, "{}", path.display());
        assert_eq!((img.height() as usize, img.width() as usize), (h, w));
        pixels.extend_from_slice(img.as_bytes());
    }
    let ours = (Tensor::from_vec(pixels, (b, h, w, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        / 255.0)
        .unwrap();
    let worst = max_abs_diff(&ours, reference).unwrap();
    assert!(
        worst <= 2.0 / 255.0,
        "{name}: image differs by {:.2}/255",
        worst * 255.0
    );
}

macro_rules! golden_cases {
    ($($name:ident),* $(,)?) => {
        mod golden_latents {$(
            #[test]
            fn $name() {
                super::check_case_latents(stringify!($name));
            }
        )*}
        mod golden_images {$(
            #[test]
            fn $name() {
                super::check_case_images(stringify!($name));
            }
        )*}
    };
}

golden_cases!(
    alpha_square_cfg,
    alpha_nonsquare_nocfg,
    sigma_square_cfg_batch2,
    sigma_nonsquare_cfg,
    alpha_binning,
    sigma_binning,
);

/// A short α run (2 steps, 64×64, 8 tokens) for tests where the golden does not matter.
fn quick_args(model: &str, out: &Path) -> Vec<String> {
    [
        "generate",
        "--model",
        model,
        "--prompt",
        "a cat",
        "--num-inference-steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--max-sequence-length",
        "8",
        "--quiet",
        "--output-dir",
        &out.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn alpha_dir() -> String {
    model_dir("tiny-pixart-alpha")
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

/// `--use-parallel-vae` on 4 ranks (CFG 2 × Ulysses 2) writes the serial run's image, within
/// 1/255 per pixel; a height of too few latent rows for the ranks is refused before any work.
#[test]
fn parallel_vae_writes_the_serial_image() {
    let serial = TempDir::new("pvae-serial");
    let r = run(xfuser().args(quick_args(&alpha_dir(), serial.path())));
    r.assert_ok();
    let parallel = TempDir::new("pvae-parallel");
    let args = with_flags(
        quick_args(&alpha_dir(), parallel.path()),
        &[
            "--use-cfg-parallel",
            "--ulysses-degree",
            "2",
            "--use-parallel-vae",
        ],
    );
    let p = run(xfuser().args(&args));
    p.assert_ok();
    let (a, b) = (r.listed(), p.listed());
    assert_eq!((a.len(), b.len()), (1, 1), "{a:?} {b:?}");
    let a = image::open(&a[0]).expect("serial png").to_rgb8();
    let b = image::open(&b[0]).expect("parallel png").to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions());
    let worst = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max();
    assert!(worst.unwrap_or(0) <= 1, "pixels differ by {worst:?}/255");

    // xDiT's spelling, 16 px: 2 latent rows for 4 ranks.
    refused(
        &alpha_dir(),
        &[
            "--use-cfg-parallel",
            "--ulysses-degree",
            "2",
            "--use_parallel_vae",
            "--height",
            "16",
            "--no-use-resolution-binning",
        ],
        &["--use-parallel-vae on 4 ranks", "2 rows"],
    );
}

/// xDiT's underscore spellings of every multi-word flag give the same result as the dashes.
#[test]
fn underscore_flag_spellings_match_the_golden() {
    let case = case("sigma_square_cfg_batch2");
    let out = TempDir::new("underscore");
    let out_str = out.path().to_string_lossy().into_owned();
    let model = model_dir(&case.model).to_string_lossy().into_owned();
    let steps = case.num_inference_steps.to_string();
    let scale = case.guidance_scale.to_string();
    let len = case.max_sequence_length.to_string();
    let seed = case.seed.to_string();
    let args: Vec<&str> = vec![
        "generate",
        "--model",
        &model,
        "--prompt",
        &case.prompts[0],
        "--prompt",
        &case.prompts[1],
        "--negative_prompt",
        &case.negative_prompt,
        "--seed",
        &seed,
        "--output_type",
        "latent",
        "--height",
        "64",
        "--width",
        "64",
        "--num_inference_steps",
        &steps,
        "--guidance_scale",
        &scale,
        "--max_sequence_length",
        &len,
        "--no_use_resolution_binning",
        "--num_images_per_prompt",
        "1",
        "--data_parallel_degree",
        "1",
        "--ulysses_degree",
        "1",
        "--ring_degree",
        "1",
        "--pipefusion_parallel_degree",
        "1",
        "--tensor_parallel_degree",
        "1",
        "--output_dir",
        &out_str,
        "--quiet",
    ];
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let latents = latents_run(&args, out.path(), &case.model);
    assert_latents_match(
        "sigma_square_cfg_batch2",
        &latents,
        &goldens("sigma_square_cfg_batch2")["latents"],
    );
}

/// `--prompt a b` (several values after one flag) is the same batch as `--prompt a --prompt b`.
#[test]
fn several_values_after_one_prompt_flag() {
    let case = case("sigma_square_cfg_batch2");
    let out = TempDir::new("multi-prompt");
    let mut args = case_args(&case, "latent", out.path());
    // Turn `--prompt p0 --prompt p1` into `--prompt p0 p1`.
    let second = args.iter().rposition(|a| a == "--prompt").unwrap();
    args.remove(second);
    let latents = latents_run(&args, out.path(), &case.model);
    assert_latents_match(
        "sigma_square_cfg_batch2",
        &latents,
        &goldens("sigma_square_cfg_batch2")["latents"],
    );
}

/// `--num-images-per-prompt 2` writes `_0.png` and `_1.png`, listed in order; without
/// `--quiet` stdout still holds only the file list.
#[test]
fn images_per_prompt_write_numbered_files() {
    let out = TempDir::new("per-prompt");
    let mut args = quick_args(&alpha_dir(), out.path());
    args.retain(|a| a != "--quiet");
    args.extend(["--num-images-per-prompt".into(), "2".into()]);
    let r = run(xfuser().args(&args));
    r.assert_ok();
    let names: Vec<String> = (0..2)
        .map(|i| format!("tiny-pixart-alpha_{STEM}_{i}.png"))
        .collect();
    assert_eq!(
        r.listed(),
        names.iter().map(|n| out.join(n)).collect::<Vec<_>>()
    );
    assert_eq!(entries(out.path()), names);
    for n in &names {
        let img = image::open(out.join(n)).expect("png");
        assert_eq!((img.width(), img.height()), (64, 64));
    }
}

/// The same seed gives the same latents; another seed gives others.
#[test]
fn seed_decides_the_result() {
    let out = TempDir::new("seed");
    let base = quick_args(&alpha_dir(), out.path());
    let with_seed = |seed: &str| {
        let mut args = base.clone();
        args.extend([
            "--seed".into(),
            seed.into(),
            "--output-type".into(),
            "latent".into(),
        ]);
        latents_run(&args, out.path(), "tiny-pixart-alpha")
    };
    let a = with_seed("7");
    let b = with_seed("7");
    let c = with_seed("8");
    assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);
    assert!(max_abs_diff(&a, &c).unwrap() > 0.0);
}

// ---------------------------------------------------------------------------------------------
// Where the model comes from
// ---------------------------------------------------------------------------------------------

/// No `--model`: the bundled tiny PixArt-α (trained) runs, and the PNG lands in `results/` under the
/// working directory.
#[test]
fn bundled_model_writes_into_results() {
    let work = TempDir::new("bundled");
    let r = run(xfuser().current_dir(work.path()).args([
        "generate",
        "--prompt",
        "x",
        "--num-inference-steps",
        "2",
        "--quiet",
    ]));
    r.assert_ok();
    let name = format!("tiny-pixart-shapes_{STEM}_0.png");
    let file = work.join("results").join(&name);
    assert!(file.is_file(), "{} missing", file.display());
    assert_eq!(entries(work.path()), vec!["results".to_string()]);
    assert_eq!(entries(&work.join("results")), vec![name.clone()]);
    assert_eq!(r.listed(), vec![Path::new("results").join(&name)]);
    let img = image::open(&file).expect("png");
    // The model's default size: sample_size 16 × VAE factor 4.
    assert_eq!((img.width(), img.height()), (64, 64));
}

/// A fake Hugging Face cache holding the α fixture as `org/tiny-pixart-alpha`.
fn fake_hub_cache(cache: &Path) {
    let repo = cache.join("models--org--tiny-pixart-alpha");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(
        &model_dir("tiny-pixart-alpha"),
        &repo.join("snapshots").join(rev),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
}

fn folder_latents(out: &Path) -> Tensor {
    let mut args = quick_args(&alpha_dir(), out);
    args.extend(["--output-type".into(), "latent".into()]);
    let latents = latents_run(&args, out, "tiny-pixart-alpha");
    std::fs::remove_dir_all(out).unwrap();
    latents
}

fn hub_args(out: &Path) -> Vec<String> {
    let mut args = quick_args("org/tiny-pixart-alpha", out);
    args.extend(["--output-type".into(), "latent".into()]);
    args
}

/// `--model org/name` is found through `HF_HUB_CACHE` offline and equals the folder run.
#[test]
fn hub_id_resolves_in_hf_hub_cache() {
    let tmp = TempDir::new("hub-cache");
    let cache = tmp.join("cache");
    fake_hub_cache(&cache);
    let want = folder_latents(&tmp.join("folder-out"));

    let out = tmp.join("out");
    let args = hub_args(&out);
    let mut cmd = xfuser();
    cmd.args(&args).env("HF_HUB_CACHE", &cache);
    let r = run(&mut cmd);
    r.assert_ok();
    let name = format!("tiny-pixart-alpha_{STEM}_latents.safetensors");
    assert_eq!(r.listed(), vec![out.join(&name)]);
    assert_eq!(
        max_abs_diff(&read_latents(&out.join(name)), &want).unwrap(),
        0.0
    );
}

/// With `HF_HUB_CACHE` unset the cache is `$HF_HOME/hub`.
#[test]
fn hub_id_resolves_in_hf_home() {
    let tmp = TempDir::new("hf-home");
    let home = tmp.join("home");
    fake_hub_cache(&home.join("hub"));
    let want = folder_latents(&tmp.join("folder-out"));

    let out = tmp.join("out");
    let args = hub_args(&out);
    let mut cmd = xfuser();
    cmd.args(&args)
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", &home);
    let r = run(&mut cmd);
    r.assert_ok();
    let name = format!("tiny-pixart-alpha_{STEM}_latents.safetensors");
    assert_eq!(
        max_abs_diff(&read_latents(&out.join(name)), &want).unwrap(),
        0.0
    );
}

/// A Hub id missing from the cache while offline: refused, naming the searched directory and
/// HF_HUB_OFFLINE, before anything is written.
#[test]
fn hub_id_missing_offline_is_an_error() {
    let tmp = TempDir::new("hub-missing");
    let cache = tmp.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let out = tmp.join("out");
    let args = hub_args(&out);
    let mut cmd = xfuser();
    cmd.args(&args).env("HF_HUB_CACHE", &cache);
    let searched = cache.join("models--org--tiny-pixart-alpha");
    run(&mut cmd).assert_error(&[
        "org/tiny-pixart-alpha",
        &searched.to_string_lossy(),
        "HF_HUB_OFFLINE",
    ]);
    assert_no_files(&out);
}

// ---------------------------------------------------------------------------------------------
// Bad input: exit ≠ 0, one `error:` line naming the problem, no file left
// ---------------------------------------------------------------------------------------------

/// `args` with `extra` applied: a `--flag value` pair replaces the value of a flag already
/// there (clap refuses a repeated flag); anything else is appended.
fn with_flags(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let value = extra.get(i + 1).filter(|v| !v.starts_with("--"));
        match (args.iter().position(|a| a == flag), value) {
            (Some(at), Some(v)) => args[at + 1] = v.to_string(),
            (None, Some(v)) => args.extend([flag.to_string(), v.to_string()]),
            (_, None) => args.push(flag.to_string()),
        }
        i += if value.is_some() { 2 } else { 1 };
    }
    args
}

/// Runs `quick_args(model)` with `extra`, expects the error, and checks the output dir holds
/// nothing afterwards.
#[track_caller]
fn refused(model: &str, extra: &[&str], needles: &[&str]) -> String {
    let tmp = TempDir::new("refused");
    let out = tmp.join("out");
    let args = with_flags(quick_args(model, &out), extra);
    let line = run(xfuser().args(&args)).assert_error(needles);
    assert_no_files(&out);
    line
}

#[test]
fn missing_model_folder() {
    let tmp = TempDir::new("missing-model");
    let missing = tmp.join("no-such-model");
    refused(
        &missing.to_string_lossy(),
        &[],
        &[&missing.to_string_lossy(), "no such folder"],
    );
}

#[test]
fn folder_without_model_index() {
    let tmp = TempDir::new("no-index");
    let dir = tmp.join("model");
    copy_dir(&model_dir("tiny-pixart-alpha"), &dir).unwrap();
    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    refused(&dir.to_string_lossy(), &[], &["model_index.json"]);
}

#[test]
fn unregistered_pipeline_class() {
    let tmp = TempDir::new("unknown-class");
    let dir = tmp.join("model");
    copy_dir(&model_dir("tiny-pixart-alpha"), &dir).unwrap();
    let index = dir.join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    assert!(text.contains("\"PixArtAlphaPipeline\""));
    std::fs::write(
        &index,
        text.replace("\"PixArtAlphaPipeline\"", "\"NoSuchPipeline\""),
    )
    .unwrap();
    refused(
        &dir.to_string_lossy(),
        &[],
        &[
            "NoSuchPipeline",
            "PixArtAlphaPipeline",
            "PixArtSigmaPipeline",
        ],
    );
}

/// A model registered only by a plugin (DiT, examples/dit-plugin): the stock binary does not
/// link it, so it refuses the folder and lists the pipelines it has; `xfuser-dit` runs it.
#[test]
fn stock_binary_refuses_a_plugin_model() {
    let dit =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dit-plugin/tests/fixtures/tiny-dit");
    assert!(dit.join("model_index.json").is_file(), "{}", dit.display());
    let line = refused(
        &dit.to_string_lossy(),
        &[],
        &[
            "unknown pipeline class `DiTPipeline`",
            "FluxPipeline",
            "PixArtAlphaPipeline",
            "PixArtSigmaPipeline",
            "StableDiffusion3Pipeline",
        ],
    );
    assert!(!line.contains("DiTPipeline,"), "{line}");
}

#[test]
fn height_not_a_multiple_of_8() {
    refused(
        &alpha_dir(),
        &["--height", "60"],
        &["--height 60", "multiple of 8"],
    );
}

#[test]
fn width_not_a_multiple_of_8() {
    refused(
        &alpha_dir(),
        &["--width", "100"],
        &["--width 100", "multiple of 8"],
    );
}

/// With binning on, a size that is a multiple of 8 but not of 16 is generated at its bin and
/// the image is resized back to exactly the requested size.
#[test]
fn binning_returns_the_requested_size() {
    let out = TempDir::new("binned-size");
    let args = with_flags(quick_args(&alpha_dir(), out.path()), &["--height", "72"]);
    let r = run(xfuser().args(&args));
    r.assert_ok();
    let img = image::open(&r.listed()[0]).expect("png");
    assert_eq!((img.width(), img.height()), (64, 72));
}

/// Without binning the latent grid must split into the transformer's 2×2 patches, so the size
/// must be a multiple of 8 × patch_size = 16; that should be refused up front, naming the flag.
#[test]
fn size_not_a_multiple_of_the_patch_grid() {
    refused(
        &alpha_dir(),
        &["--height", "72", "--no-use-resolution-binning"],
        &["--height 72", "16"],
    );
}

#[test]
fn zero_inference_steps() {
    refused(
        &alpha_dir(),
        &["--num-inference-steps", "0"],
        &["--num-inference-steps"],
    );
}

#[test]
fn zero_images_per_prompt() {
    refused(
        &alpha_dir(),
        &["--num-images-per-prompt", "0"],
        &["--num-images-per-prompt"],
    );
}

#[test]
fn zero_max_sequence_length() {
    refused(
        &alpha_dir(),
        &["--max-sequence-length", "0"],
        &["--max-sequence-length"],
    );
}

#[test]
fn no_prompt() {
    let tmp = TempDir::new("no-prompt");
    let out = tmp.join("out");
    let r = run(xfuser().args([
        "generate",
        "--model",
        &alpha_dir(),
        "--quiet",
        "--output-dir",
        &out.to_string_lossy(),
    ]));
    r.assert_error(&["--prompt"]);
    assert_no_files(&out);
}

/// An output dir that cannot be created (its parent is a regular file; root ignores
/// permissions, so that is the portable way to make it unwritable).
#[test]
fn unwritable_output_dir() {
    let tmp = TempDir::new("unwritable");
    let file = tmp.join("a-file");
    std::fs::write(&file, b"keep").unwrap();
    let out = file.join("out");
    let mut args = quick_args(&alpha_dir(), &out);
    args.extend(["--output-type".into(), "latent".into()]);
    run(xfuser().args(&args)).assert_error(&[&out.to_string_lossy(), "output directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    assert_eq!(entries(tmp.path()), vec!["a-file".to_string()]);
}

#[test]
fn truncated_transformer_weights() {
    let tmp = TempDir::new("truncated");
    let dir = tmp.join("model");
    copy_dir(&model_dir("tiny-pixart-alpha"), &dir).unwrap();
    let weights = dir.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    refused(&dir.to_string_lossy(), &[], &[&weights.to_string_lossy()]);
}

#[test]
fn mistyped_config_field() {
    let tmp = TempDir::new("bad-config");
    let dir = tmp.join("model");
    copy_dir(&model_dir("tiny-pixart-alpha"), &dir).unwrap();
    let config = dir.join("transformer/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"num_layers\": 2"));
    std::fs::write(
        &config,
        text.replace("\"num_layers\": 2", "\"num_layers\": \"two\""),
    )
    .unwrap();
    refused(
        &dir.to_string_lossy(),
        &[],
        &[&config.to_string_lossy(), "num_layers"],
    );
}

/// `--dtype f16` and `bf16` write the PNG of a golden case close to diffusers' f32 image (the
/// bounds of tests/pipeline_dtype.rs: f16 within 4/255 per pixel, bf16 within rel L2 3e-2).
#[test]
fn half_precision_writes_a_png_close_to_the_f32_image() {
    let name = "alpha_square_cfg";
    let case = case(name);
    let reference = &goldens(name)["image"];
    for (dtype, rel_bound, pixel_bound) in [("f16", 1e-2, 8.0), ("bf16", 3e-2, 32.0)] {
        let out = TempDir::new(&format!("{name}-{dtype}"));
        let args = with_flags(case_args(&case, "pil", out.path()), &["--dtype", dtype]);
        let r = run(xfuser().args(&args));
        r.assert_ok();
        let path = out.join(format!("{}_{STEM}_0.png", case.model));
        assert_eq!(r.listed(), vec![path.clone()], "stdout: {}", r.stdout);
        let img = image::open(&path).expect("decode png");
        let (h, w) = (img.height() as usize, img.width() as usize);
        let ours = (Tensor::from_vec(img.to_rgb8().into_raw(), (1, h, w, 3), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            / 255.0)
            .unwrap();
        let err = rel_l2(&ours, reference).unwrap();
        let worst = max_abs_diff(&ours, reference).unwrap() * 255.0;
        assert!(
            err <= rel_bound,
            "{dtype}: image rel L2 {err:.3e} > {rel_bound:.0e}"
        );
        assert!(
            worst <= pixel_bound,
            "{dtype}: image differs by {worst:.2}/255"
        );
    }
}

/// A build without the `cuda` feature names the flag and the feature to build with.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_needs_the_cuda_feature() {
    for device in ["cuda", "cuda:1"] {
        refused(
            &alpha_dir(),
            &["--device", device],
            &["--device cuda", "--features cuda"],
        );
    }
}

#[test]
fn unknown_device_is_refused_by_name() {
    let tmp = TempDir::new("bad-device");
    let args = with_flags(
        quick_args(&alpha_dir(), &tmp.join("out")),
        &["--device", "gpu"],
    );
    let r = run(xfuser().args(&args));
    assert!(!r.ok());
    assert!(
        r.stderr.contains("--device") && r.stderr.contains("expected cpu, cuda or cuda:N"),
        "{}",
        r.stderr
    );
    assert_no_files(&tmp.join("out"));
}

#[test]
fn zero_parallel_degree() {
    refused(
        &alpha_dir(),
        &["--ulysses-degree", "0"],
        &["--ulysses-degree", "at least 1"],
    );
}

/// Tensor parallelism gives every rank whole heads: degree 3 on the 2-head α fixture is
/// refused, naming the flag and the heads.
#[test]
fn tensor_parallel_degree_must_divide_the_heads() {
    refused(
        &alpha_dir(),
        &["--tensor-parallel-degree", "3"],
        &["--tensor-parallel-degree 3", "2 attention heads"],
    );
}

/// Flux splits over tensor-parallel ranks too, with the same check: degree 4 does not divide
/// tiny-flux-dev's 2 heads.
#[test]
fn flux_tensor_parallel_degree_must_divide_the_heads() {
    refused(
        &flux_dev_dir().to_string_lossy(),
        &["--tensor-parallel-degree", "4"],
        &["--tensor-parallel-degree 4", "2 attention heads"],
    );
}

/// `--tensor-parallel-degree 2` through the binary: the latents of the serial run (rel L2 ≤
/// 1e-5), and `--report-comm`'s tp all-reduce bytes equal to the cost model of
/// docs/tensor-parallel.md: per rank and forward, 3 all-reduces per block of the (B, N, D)
/// f32 activations, 2(T−1)/T of them each.
#[test]
fn tensor_parallel_run_matches_serial() {
    let serial_out = TempDir::new("tp-serial");
    let args = with_flags(
        quick_args(&alpha_dir(), serial_out.path()),
        &["--output-type", "latent"],
    );
    let serial = latents_run(&args, serial_out.path(), "tiny-pixart-alpha");
    let tp_out = TempDir::new("tp2");
    let args = with_flags(
        quick_args(&alpha_dir(), tp_out.path()),
        &[
            "--output-type",
            "latent",
            "--tensor-parallel-degree",
            "2",
            "--report-comm",
        ],
    );
    let r = run(xfuser().args(&args));
    r.assert_ok();
    // The file name carries the tp degree.
    let name =
        "tiny-pixart-alpha_result_dp1_cfg1_ulysses1_ring1_tp2_pp1_patch1_latents.safetensors";
    let tp = read_latents(&tp_out.join(name));
    let err = rel_l2(&tp, &serial).unwrap();
    assert!(err <= 1e-5, "tp 2 vs serial: latents rel L2 {err:.3e}");
    // α: D = 64, 2 blocks, patch 2; the latent's tokens (the size after resolution binning);
    // guidance on → batch 2; 2 steps, 2 ranks.
    let (_, _, h, w) = tp.dims4().unwrap();
    let tokens = (h / 2) * (w / 2);
    let (t, batch, dim, blocks, steps) = (2, 2, 64, 2, 2);
    let per_all_reduce = 2 * (t - 1) * (batch * tokens * dim * 4) / t;
    let expected = t * steps * 3 * blocks * per_all_reduce;
    let line = r
        .stderr
        .lines()
        .find(|l| l.trim_start().starts_with("tp[0,1]") && l.contains("all_reduce_sum"))
        .unwrap_or_else(|| panic!("no tp all-reduce line in:\n{}", r.stderr));
    assert!(
        line.contains(&format!(" {expected} bytes sent")),
        "expected {expected} bytes: {line}"
    );
}

/// Ulysses splits the heads: degree 3 on the 2-head α fixture is refused, naming the heads.
#[test]
fn ulysses_degree_must_divide_the_heads() {
    refused(
        &alpha_dir(),
        &["--ulysses-degree", "3"],
        &["--ulysses-degree 3", "2 attention heads"],
    );
}

/// The heads check needs only transformer/config.json, so it must come before any weights are
/// read: with broken VAE weights the error is still the heads one.
#[test]
fn ulysses_heads_are_checked_before_loading_weights() {
    let tmp = TempDir::new("heads-first");
    let dir = tmp.join("model");
    copy_dir(&model_dir("tiny-pixart-alpha"), &dir).unwrap();
    std::fs::write(
        dir.join("vae/diffusion_pytorch_model.safetensors"),
        b"broken",
    )
    .unwrap();
    refused(
        &dir.to_string_lossy(),
        &["--ulysses-degree", "3"],
        &["--ulysses-degree 3", "2 attention heads"],
    );
}

#[test]
fn cfg_parallel_needs_guidance() {
    refused(
        &alpha_dir(),
        &["--use-cfg-parallel", "--guidance-scale", "1"],
        &["--use-cfg-parallel", "--guidance-scale"],
    );
}

#[test]
fn data_parallel_needs_enough_images() {
    refused(
        &alpha_dir(),
        &["--data-parallel-degree", "2"],
        &["--data-parallel-degree 2"],
    );
}

/// The parallel methods through the CLI: the golden latents, and the degrees in the file name.
#[test]
fn parallel_runs_match_the_golden() {
    let runs: [(&str, &[&str], &str); 5] = [
        (
            "alpha_square_cfg",
            &["--ulysses-degree", "2"],
            "dp1_cfg1_ulysses2_ring1_tp1_pp1_patch1",
        ),
        (
            "alpha_square_cfg",
            &["--ring-degree", "2"],
            "dp1_cfg1_ulysses1_ring2_tp1_pp1_patch1",
        ),
        (
            "alpha_square_cfg",
            &["--use-cfg-parallel"],
            "dp1_cfg2_ulysses1_ring1_tp1_pp1_patch1",
        ),
        (
            "alpha_square_cfg",
            &[
                "--use-cfg-parallel",
                "--ulysses-degree",
                "2",
                "--ring-degree",
                "2",
            ],
            "dp1_cfg2_ulysses2_ring2_tp1_pp1_patch1",
        ),
        (
            "sigma_square_cfg_batch2",
            &["--data-parallel-degree", "2"],
            "dp2_cfg1_ulysses1_ring1_tp1_pp1_patch1",
        ),
    ];
    for (name, extra, degrees) in runs {
        let case = case(name);
        let out = TempDir::new("parallel");
        let args = with_flags(case_args(&case, "latent", out.path()), extra);
        let r = run(xfuser().args(&args));
        r.assert_ok();
        let file = out.join(format!(
            "{}_result_{degrees}_latents.safetensors",
            case.model
        ));
        assert_eq!(r.listed(), vec![file.clone()], "{name} {extra:?}");
        let err = rel_l2(&read_latents(&file), &goldens(name)["latents"]).unwrap();
        assert!(err <= 1e-4, "{name} {extra:?}: latents rel L2 {err:.3e}");
    }
}

/// `--model .` (run inside the model folder) should name the outputs after the folder, not
/// write hidden `._result_…` files.
#[test]
fn model_dot_names_outputs_after_the_folder() {
    let tmp = TempDir::new("dot");
    let dir = tmp.join("tiny-pixart-alpha");
    copy_dir(&model_dir("tiny-pixart-alpha"), &dir).unwrap();
    let out = tmp.join("out");
    let r = run(xfuser().current_dir(&dir).args(with_flags(
        quick_args(".", &out),
        &["--output-type", "latent"],
    )));
    r.assert_ok();
    assert_eq!(
        entries(&out),
        vec![format!("tiny-pixart-alpha_{STEM}_latents.safetensors")]
    );
}

// ---------------------------------------------------------------------------------------------
// Stable Diffusion 3
// ---------------------------------------------------------------------------------------------

fn sd3_dir() -> PathBuf {
    fixtures_dir().join("sd3/tiny-sd3")
}

/// The SD3 golden `square_cfg` through the CLI: (1, 16, 8, 8) latents within 1e-4 of
/// diffusers'.
#[test]
fn sd3_latents_match_the_golden() {
    let out = TempDir::new("sd3-latent");
    let args: Vec<String> = [
        "generate",
        "--model",
        &sd3_dir().to_string_lossy(),
        "--prompt",
        "a red cat sitting on the moon",
        "--height",
        "64",
        "--width",
        "64",
        "--num-inference-steps",
        "6",
        "--guidance-scale",
        "5",
        "--seed",
        "0",
        "--max-sequence-length",
        "16",
        "--output-type",
        "latent",
        "--quiet",
        "--output-dir",
        &out.path().to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let latents = latents_run(&args, out.path(), "tiny-sd3");
    assert_eq!(latents.dims(), [1, 16, 8, 8]);
    let golden = load_goldens(&fixtures_dir().join("sd3/goldens/square_cfg.safetensors")).unwrap();
    assert_latents_match("sd3 square_cfg", &latents, &golden["latents"]);
}

#[test]
fn sd3_ulysses_degree_must_divide_the_heads() {
    refused(
        &sd3_dir().to_string_lossy(),
        &["--ulysses-degree", "3"],
        &["--ulysses-degree 3", "4 attention heads"],
    );
}

// ---------------------------------------------------------------------------------------------
// Flux
// ---------------------------------------------------------------------------------------------

fn flux_dev_dir() -> PathBuf {
    fixtures_dir().join("flux/tiny-flux-dev")
}

/// The Flux golden `dev_true_cfg` through the CLI (`--true-cfg-scale` with a negative prompt):
/// unpacked (1, 16, 8, 8) latents within 1e-4 of diffusers'.
#[test]
fn flux_true_cfg_latents_match_the_golden() {
    let out = TempDir::new("flux-latent");
    let args: Vec<String> = [
        "generate",
        "--model",
        &flux_dev_dir().to_string_lossy(),
        "--prompt",
        "a photo of a boat on the river",
        "--negative-prompt",
        "blurry",
        "--true-cfg-scale",
        "4",
        "--guidance-scale",
        "3.5",
        "--height",
        "64",
        "--width",
        "64",
        "--num-inference-steps",
        "3",
        "--seed",
        "3",
        "--max-sequence-length",
        "16",
        "--output-type",
        "latent",
        "--quiet",
        "--output-dir",
        &out.path().to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let latents = latents_run(&args, out.path(), "tiny-flux-dev");
    assert_eq!(latents.dims(), [1, 16, 8, 8]);
    let golden =
        load_goldens(&fixtures_dir().join("flux/goldens/dev_true_cfg.safetensors")).unwrap();
    assert_latents_match("flux dev_true_cfg", &latents, &golden["latents"]);
}

/// Flux packs 2×2 latent patches: a height that is a multiple of 8 but not of 16 is refused.
#[test]
fn flux_height_must_be_a_multiple_of_16() {
    refused(
        &flux_dev_dir().to_string_lossy(),
        &["--height", "72", "--no-use-resolution-binning"],
        &["--height 72", "16"],
    );
}

/// A Flux folder whose model_index.json lacks text_encoder_2 is refused, naming it.
#[test]
fn flux_without_text_encoder_2_is_refused() {
    let tmp = TempDir::new("flux-no-t5");
    let dir = tmp.join("model");
    copy_dir(&flux_dev_dir(), &dir).unwrap();
    let index = dir.join("model_index.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["text_encoder_2"] = serde_json::json!([null, null]);
    std::fs::write(&index, json.to_string()).unwrap();
    refused(
        &dir.to_string_lossy(),
        &[],
        &["text_encoder_2", "FluxPipeline"],
    );
}

/// Flux has no classifier-free guidance unless true CFG is asked for: CFG parallel says so.
#[test]
fn flux_cfg_parallel_needs_true_cfg() {
    refused(
        &flux_dev_dir().to_string_lossy(),
        &["--use-cfg-parallel"],
        &["--true-cfg-scale", "--negative-prompt"],
    );
}

// ---------------------------------------------------------------------------------------------
// Step cache
// ---------------------------------------------------------------------------------------------

/// `flag` at threshold 0 computes every step of `steps` (and says so on stderr, even with
/// `--quiet`) and gives the uncached latents; a huge threshold computes only `always`.
fn check_cache_reports_its_steps(flag: &str, steps: usize, always: usize) {
    let tmp = TempDir::new(flag.trim_start_matches('-'));
    let out = tmp.join("out");
    let mut base = with_flags(quick_args(&alpha_dir(), &out), &["--output-type", "latent"]);
    let at = base
        .iter()
        .position(|a| a == "--num-inference-steps")
        .unwrap();
    base[at + 1] = steps.to_string();
    let plain = latents_run(&base, &out, "tiny-pixart-alpha");
    std::fs::remove_dir_all(&out).unwrap();
    let cached = with_flags(base.clone(), &[flag, "--cache-threshold", "0"]);
    let r = run(xfuser().args(&cached));
    r.assert_ok();
    let line = format!("cache: computed {steps} of {steps} transformer steps");
    assert!(r.stderr.contains(&line), "stderr: {}", r.stderr);
    let name = format!("tiny-pixart-alpha_{STEM}_latents.safetensors");
    let err = rel_l2(&read_latents(&out.join(name)), &plain).unwrap();
    assert!(err <= 1e-6, "{flag}: threshold 0 vs uncached: {err:.3e}");
    std::fs::remove_dir_all(&out).unwrap();
    let skipping = with_flags(base, &[flag, "--cache-threshold", "1e9"]);
    let r = run(xfuser().args(&skipping));
    r.assert_ok();
    let line = format!("cache: computed {always} of {steps} transformer steps");
    assert!(r.stderr.contains(&line), "stderr: {}", r.stderr);
}

/// First-Block-Cache: 2 steps, a huge threshold computes only the first.
#[test]
fn fbcache_reports_its_steps() {
    check_cache_reports_its_steps("--use-fbcache", 2, 1);
}

/// TeaCache: 3 steps, a huge threshold still computes the first and the last.
#[test]
fn teacache_reports_its_steps() {
    check_cache_reports_its_steps("--use-teacache", 3, 2);
}

#[test]
fn two_caches_and_bad_thresholds_are_refused() {
    refused(
        &alpha_dir(),
        &["--use-fbcache", "--use-teacache"],
        &["--use-fbcache", "--use-teacache", "choose one"],
    );
    refused(
        &alpha_dir(),
        &["--use-teacache", "--cache-threshold=-1"],
        &["--cache-threshold -1", "≥ 0"],
    );
}

// ---------------------------------------------------------------------------------------------
// list
// ---------------------------------------------------------------------------------------------

#[test]
fn list_prints_the_registry() {
    let r = run(xfuser().arg("list"));
    r.assert_ok();
    let out = &r.stdout;
    for needle in [
        "pipelines:",
        "PixArtAlphaPipeline",
        "PixArtSigmaPipeline",
        "transformers:",
        "PixArtTransformer2DModel",
        "StableDiffusion3Pipeline",
        "SD3Transformer2DModel",
        "FluxPipeline",
        "FluxTransformer2DModel",
        "FlowMatchEulerDiscreteScheduler",
        "schedulers:",
        "DPMSolverMultistepScheduler",
        "DDIMScheduler",
        "EulerDiscreteScheduler",
    ] {
        assert!(out.contains(needle), "`xfuser list` lacks {needle}:\n{out}");
    }
    // Pipelines come under their heading.
    let pipelines = out.find("pipelines:").unwrap();
    let transformers = out.find("transformers:").unwrap();
    assert!(out[pipelines..transformers].contains("PixArtAlphaPipeline"));
}

// ---------------------------------------------------------------------------------------------
// The library API, as docs/user-guide.md shows it
// ---------------------------------------------------------------------------------------------

#[test]
fn library_api_as_in_the_user_guide() {
    use xfuser::core::engine::{EngineConfig, InputConfig, OutputType};
    use xfuser::core::pipeline::DiffusionPipeline;
    use xfuser::pipelines::{xFuserPipeline, xFuserPixArtAlphaPipeline};

    let tmp = TempDir::new("library");
    let engine = EngineConfig::new(alpha_dir());
    let pipeline = xFuserPipeline::from_pretrained(&engine).unwrap();
    assert_eq!(pipeline.class_name(), "PixArtAlphaPipeline");
    let input = InputConfig {
        prompts: vec!["an astronaut riding a horse".into()],
        num_inference_steps: 2,
        seed: 42,
        ..Default::default()
    };
    let mut steps = Vec::new();
    let output = pipeline
        .generate(&input, &mut |step, total| steps.push((step, total)))
        .unwrap();
    assert_eq!(steps.last(), Some(&(2, 2)));
    assert_eq!(output.images.len(), 1);
    for (i, image) in output.images.iter().enumerate() {
        let path = tmp.join(format!("out_{i}.png"));
        xfuser::pipelines::image::save_rgb_png(image, &path).unwrap();
        assert_eq!(image::open(&path).unwrap().width(), 256);
    }

    // The typed pipeline gives the same latents.
    let alpha = xFuserPixArtAlphaPipeline::from_pretrained(&engine).unwrap();
    let latent_input = InputConfig {
        output_type: OutputType::Latent,
        ..input
    };
    let typed = alpha.generate(&latent_input, &mut |_, _| {}).unwrap();
    assert!(typed.images.is_empty());
    assert_eq!(max_abs_diff(&typed.latents, &output.latents).unwrap(), 0.0);
}
