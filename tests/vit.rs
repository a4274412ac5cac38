//! `xfuser classify` and the ViT classifier behind it, on the tiny random-weight
//! `ViTForImageClassification` models of tests/fixtures/vit (scripts/fixtures/vit.py):
//! preprocessing and logits against transformers, every dp × tp × pp layout against the serial
//! run, what each rank loads, the refusals, and the binary end to end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use xfuser::core::classifier::ImageClassifier;
use xfuser::core::engine::{ParallelConfig, RgbImage};
use xfuser::core::registry::LoadOptions;
use xfuser::core::testing::{copy_dir, fixtures_dir, load_goldens, rel_l2};
use xfuser::layers::tensor_parallel::TpRank;
use xfuser::pipelines::classify::ParallelClassifier;
use xfuser::pipelines::image_processing::read_rgb_image;
use xfuser::transformers::vit::ViTForImageClassification;

const MODELS: [&str; 2] = ["vit-a", "vit-b"];
/// The logits of the fixture's models against transformers' (fp32).
const TOL_REFERENCE: f64 = 1e-4;
/// Every parallel layout against the serial run.
const TOL_SERIAL: f64 = 1e-5;

fn vit_dir() -> PathBuf {
    fixtures_dir().join("vit")
}

fn image_paths() -> Vec<PathBuf> {
    (0..4)
        .map(|i| vit_dir().join(format!("images/img{i}.png")))
        .collect()
}

fn images() -> Vec<RgbImage> {
    image_paths()
        .iter()
        .map(|p| read_rgb_image(p).unwrap())
        .collect()
}

#[derive(serde::Deserialize)]
struct Golden {
    logits: Vec<Vec<f32>>,
    labels: Vec<String>,
}

fn golden() -> HashMap<String, Golden> {
    let text = std::fs::read_to_string(vit_dir().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rows(logits: &[Vec<f32>]) -> Tensor {
    let (n, l) = (logits.len(), logits[0].len());
    let flat: Vec<f32> = logits.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (n, l), &Device::Cpu).unwrap()
}

fn layout(dp: usize, tp: usize, pp: usize) -> ParallelConfig {
    ParallelConfig {
        data_parallel_degree: dp,
        tensor_parallel_degree: tp,
        pipefusion_parallel_degree: pp,
        ..ParallelConfig::default()
    }
}

fn classify(model: &str, images: &[RgbImage], parallel: &ParallelConfig) -> Vec<Vec<f32>> {
    ParallelClassifier::load(&vit_dir().join(model), parallel)
        .unwrap()
        .classify(images)
        .unwrap()
        .logits
}

#[test]
fn resized_pictures_equal_the_processors_to_the_level() {
    let resized = load_goldens(&vit_dir().join("golden_resized.safetensors")).unwrap();
    let images = images();
    for model in MODELS {
        let classifier =
            ParallelClassifier::load(&vit_dir().join(model), &ParallelConfig::default()).unwrap();
        let golden = &resized[&format!("{model}.resized")];
        for (i, image) in images.iter().enumerate() {
            let ours = classifier.processor().resize(image);
            let (h, w) = (ours.height, ours.width);
            // (H, W, 3) interleaved → (3, H, W), as the golden.
            let ours = Tensor::from_vec(ours.data, (h, w, 3), &Device::Cpu)
                .unwrap()
                .permute((2, 0, 1))
                .unwrap();
            let theirs = golden.get(i).unwrap();
            let diff: Vec<u8> = (ours.to_dtype(candle_core::DType::F32).unwrap()
                - theirs.to_dtype(candle_core::DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::U8)
            .unwrap()
            .to_vec1()
            .unwrap();
            let differing = diff.iter().filter(|d| **d != 0).count();
            assert_eq!(
                differing,
                0,
                "{model} image {i}: {differing} of {} levels differ from PIL's resize (max {})",
                diff.len(),
                diff.iter().max().unwrap()
            );
        }
    }
}

#[test]
fn logits_match_transformers_for_both_models_and_every_image() {
    let images = images();
    let golden = golden();
    for model in MODELS {
        let ours = classify(model, &images, &ParallelConfig::default());
        let reference = &golden[model];
        for (i, (row, expected)) in ours.iter().zip(&reference.logits).enumerate() {
            let err = rel_l2(
                &rows(std::slice::from_ref(row)),
                &rows(std::slice::from_ref(expected)),
            )
            .unwrap();
            eprintln!("{model} image {i}: rel L2 {err:.2e} against transformers");
            assert!(err <= TOL_REFERENCE, "{model} image {i}: rel L2 {err:e}");
        }
        let labels = ParallelClassifier::load(&vit_dir().join(model), &ParallelConfig::default())
            .unwrap()
            .classify(&images)
            .unwrap()
            .labels;
        assert_eq!(labels, reference.labels, "{model}");
    }
}

#[test]
fn every_dp_tp_pp_layout_equals_the_serial_run() {
    // Five pictures, so that data parallelism splits them unevenly (3 + 2).
    let mut images = images();
    images.push(images[2].clone());
    for model in MODELS {
        let serial = rows(&classify(model, &images, &ParallelConfig::default()));
        for dp in [1, 2] {
            for tp in [1, 2] {
                for pp in [1, 2] {
                    if (dp, tp, pp) == (1, 1, 1) {
                        continue;
                    }
                    let ours = rows(&classify(model, &images, &layout(dp, tp, pp)));
                    let err = rel_l2(&ours, &serial).unwrap();
                    eprintln!("{model} dp {dp} tp {tp} pp {pp}: rel L2 {err:.2e} against serial");
                    assert!(
                        err <= TOL_SERIAL,
                        "{model} dp {dp} tp {tp} pp {pp}: rel L2 {err:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn tensor_parallelism_sums_its_row_layers_once_per_attention_and_mlp() {
    // vit-b: 3 layers, 2 all-reduces each, per image, on each of the 2 tp ranks.
    let dir = vit_dir().join("vit-b");
    let result = ParallelClassifier::load(&dir, &layout(1, 2, 1))
        .unwrap()
        .classify(&images())
        .unwrap();
    let counts = result
        .comm_stats
        .sum(|k| k.op == xfuser::core::distributed::CommOp::AllReduceSum);
    assert_eq!(counts.calls, 4 * 3 * 2 * 2);
}

fn load_part(model: &str, stage: usize, stages: usize, tp: TpRank) -> ViTForImageClassification {
    let options = LoadOptions {
        stage: Some(xfuser::core::backbone::PipelineStage {
            index: stage,
            num_stages: stages,
            layer_counts: None,
        }),
        tp,
        ..LoadOptions::default()
    };
    ViTForImageClassification::load(&vit_dir().join(model), &options).unwrap()
}

#[test]
fn each_rank_reads_only_its_stage_and_its_shard() {
    let model = "vit-b";
    let file = vit_dir().join(model).join("model.safetensors");
    let total: u64 = candle_core::safetensors::load(&file, &Device::Cpu)
        .unwrap()
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    // The stages of one tp position read every tensor once between them.
    let stages: Vec<_> = (0..2)
        .map(|s| load_part(model, s, 2, TpRank::serial()))
        .collect();
    assert_eq!(stages.iter().map(|s| s.bytes_read()).sum::<u64>(), total);
    assert_eq!(stages[0].held_layers(), 0..2);
    assert_eq!(stages[1].held_layers(), 2..3);
    // Two shards of the first stage hold its split layers once, but for the row layers'
    // biases (attention output and MLP output, D each), which both hold whole.
    let whole = &stages[0];
    let shards: Vec<_> = (0..2)
        .map(|r| load_part(model, 0, 2, TpRank::new(r, 2).unwrap()))
        .collect();
    let d = whole.config().hidden_size;
    let row_biases = whole.held_layers().len() * 2 * d * 4;
    assert_eq!(
        shards
            .iter()
            .map(|s| s.split_parameter_bytes())
            .sum::<usize>(),
        whole.split_parameter_bytes() + row_biases
    );
    assert!(shards.iter().all(|s| s.bytes_read() < whole.bytes_read()));
}

fn load_error(dir: &Path, parallel: &ParallelConfig) -> String {
    match ParallelClassifier::load(dir, parallel) {
        Ok(_) => panic!("{} loaded for {parallel:?}", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_tensor_parallel_degree_that_does_not_divide_the_heads_is_refused() {
    let msg = load_error(&vit_dir().join("vit-a"), &layout(1, 3, 1));
    assert!(
        msg.contains("--tensor-parallel-degree 3") && msg.contains("4 attention heads"),
        "{msg}"
    );
}

#[test]
fn more_pipeline_stages_than_layers_are_refused() {
    let msg = load_error(&vit_dir().join("vit-a"), &layout(1, 1, 3));
    assert!(
        msg.contains("--pipeline-parallel-degree 3") && msg.contains("2 encoder layers"),
        "{msg}"
    );
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("xfuser-vit-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn an_unknown_architecture_is_refused_listing_the_known() {
    let tmp = TempDir::new("arch");
    let dir = tmp.0.join("model");
    copy_dir(&vit_dir().join("vit-a"), &dir).unwrap();
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("ViTForImageClassification", "ResNetForImageClassification"),
    )
    .unwrap();
    let msg = load_error(&dir, &ParallelConfig::default());
    assert!(
        msg.contains("ResNetForImageClassification") && msg.contains("ViTForImageClassification"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

fn xfuser() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xfuser"));
    for var in ["RUST_BACKTRACE", "RUST_LIB_BACKTRACE", "RUST_LOG"] {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn classify_writes_the_json_and_refuses_an_unreadable_picture() {
    let tmp = TempDir::new("cli");
    let out = tmp.0.join("out.json");
    let model = vit_dir().join("vit-b");
    let run = xfuser()
        .arg("classify")
        .arg("--model")
        .arg(&model)
        .args(image_paths())
        .arg("--output-json")
        .arg(&out)
        .args(["--data-parallel-degree", "2"])
        .args(["--tensor-parallel-degree", "2"])
        .args(["--pipeline-parallel-degree", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "classify failed: {stderr}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let logits: Vec<Vec<f32>> = serde_json::from_value(written["logits"].clone()).unwrap();
    let labels: Vec<String> = serde_json::from_value(written["labels"].clone()).unwrap();
    let reference = &golden()["vit-b"];
    let err = rel_l2(&rows(&logits), &rows(&reference.logits)).unwrap();
    assert!(err <= TOL_REFERENCE, "rel L2 {err:e}");
    assert_eq!(labels, reference.labels);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).lines().count(),
        4,
        "one line per picture"
    );

    // A file that is not a picture: one line naming it, before any work, nothing written.
    let bad = tmp.0.join("notes.png");
    std::fs::write(&bad, "not a picture").unwrap();
    let out2 = tmp.0.join("out2.json");
    let run = xfuser()
        .arg("classify")
        .arg("--model")
        .arg(&model)
        .arg(&image_paths()[0])
        .arg(&bad)
        .arg("--output-json")
        .arg(&out2)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error:") && lines[0].contains("notes.png"),
        "{stderr}"
    );
    assert!(!out2.exists());
    let left: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.iter().any(|n| n.contains(".tmp-")), "{left:?}");
}

#[test]
fn list_shows_the_classifiers_under_their_heading() {
    let run = xfuser().arg("list").output().unwrap();
    assert!(run.status.success());
    let out = String::from_utf8_lossy(&run.stdout);
    let heading = out.find("classifiers:").expect("a classifiers heading");
    assert!(
        out[heading..].contains("ViTForImageClassification"),
        "{out}"
    );
}
