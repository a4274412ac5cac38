//! Parity of the SD3 CLIP text side with transformers 5.23: the ids of both CLIP tokenizers
//! (CLIP-L pads with `<|endoftext|>`, CLIP-G with `!`), the penultimate hidden states and pooled
//! projections of both `CLIPTextModelWithProjection` (quick_gelu and exact gelu), and errors
//! that name the file. Fixtures: `scripts/fixtures/sd3.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xfuser_core::testing::{fixtures_dir, load_goldens, rel_l2};
use xfuser_pipelines::text::{ClipTextModelWithProjection, ClipTokenizer};

fn sd3_dir() -> PathBuf {
    fixtures_dir().join("sd3")
}

fn pipeline_dir() -> PathBuf {
    sd3_dir().join("tiny-sd3")
}

fn prompts() -> Vec<String> {
    let text = std::fs::read_to_string(sd3_dir().join("text.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(meta["prompts"].clone()).unwrap()
}

fn goldens() -> HashMap<String, Tensor> {
    load_goldens(&sd3_dir().join("text.safetensors")).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

/// A fresh scratch folder under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xfuser-clip-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.iter().any(|s| name == **s) {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name)).unwrap();
    }
}

fn check_tokenizer(folder: &str, pad: &str) {
    let tokenizer = ClipTokenizer::from_dir(&pipeline_dir().join(folder)).unwrap();
    assert_eq!(tokenizer.model_max_length(), Some(77));
    assert_eq!(tokenizer.inner().token_to_id(pad), Some(tokenizer.pad_id()));
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ids = tokenizer.encode_batch(&prompts, 77, &Device::Cpu).unwrap();
    assert_eq!(ids.dims(), [prompts.len(), 77]);
    let got = rows(&ids);
    let want = rows(&goldens()[&format!("{folder}.input_ids")]);
    for (i, prompt) in prompts.iter().enumerate() {
        assert_eq!(got[i], want[i], "{folder}: ids of {prompt:?}");
        // bos first; the eos right after the prompt, kept last when truncated.
        assert_eq!(got[i][0], i64::from(tokenizer.bos_id()));
        assert!(got[i].contains(&i64::from(tokenizer.eos_id())));
    }
}

#[test]
fn clip_l_tokenizer_matches_transformers() {
    check_tokenizer("tokenizer", "<|endoftext|>");
}

#[test]
fn clip_g_tokenizer_pads_with_bang_and_matches_transformers() {
    check_tokenizer("tokenizer_2", "!");
}

fn check_encoder(folder: &str, tokenizer_folder: &str) {
    let device = Device::Cpu;
    let model =
        ClipTextModelWithProjection::from_dir(&pipeline_dir().join(folder), DType::F32, &device)
            .unwrap();
    let goldens = goldens();
    let ids = &goldens[&format!("{tokenizer_folder}.input_ids")];
    let out = model.forward(ids).unwrap();
    let penultimate = &goldens[&format!("{folder}.penultimate")];
    let pooled = &goldens[&format!("{folder}.pooled")];
    assert_eq!(out.penultimate.dims(), penultimate.dims());
    assert_eq!(out.pooled.dims(), pooled.dims());
    let e_hidden = rel_l2(&out.penultimate, penultimate).unwrap();
    let e_pooled = rel_l2(&out.pooled, pooled).unwrap();
    assert!(
        e_hidden <= 1e-5,
        "{folder}: penultimate rel L2 {e_hidden:e}"
    );
    assert!(e_pooled <= 1e-5, "{folder}: pooled rel L2 {e_pooled:e}");

    // Our tokenizer's u32 ids give the same outputs as the golden i64 ids.
    let tokenizer = ClipTokenizer::from_dir(&pipeline_dir().join(tokenizer_folder)).unwrap();
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ours = tokenizer.encode_batch(&prompts, 77, &device).unwrap();
    let again = model.forward(&ours).unwrap();
    assert!(rel_l2(&again.pooled, pooled).unwrap() <= 1e-5);
}

#[test]
fn clip_l_encoder_quick_gelu_matches_transformers() {
    check_encoder("text_encoder", "tokenizer");
}

#[test]
fn clip_g_encoder_exact_gelu_matches_transformers() {
    check_encoder("text_encoder_2", "tokenizer_2");
}

/// With the legacy `eos_token_id: 2` transformers pools at argmax(input_ids): the eos, the
/// largest id of these vocabularies, so the outputs do not change.
#[test]
fn legacy_eos_id_pools_at_the_largest_id() {
    let dir = scratch("legacy-eos");
    copy_dir(
        &pipeline_dir().join("text_encoder_2"),
        &dir,
        &["config.json"],
    );
    let config =
        std::fs::read_to_string(pipeline_dir().join("text_encoder_2/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["eos_token_id"] = 2.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let model = ClipTextModelWithProjection::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let goldens = goldens();
    let out = model.forward(&goldens["tokenizer_2.input_ids"]).unwrap();
    let e = rel_l2(&out.pooled, &goldens["text_encoder_2.pooled"]).unwrap();
    assert!(e <= 1e-5, "pooled rel L2 {e:e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_merges_names_the_file() {
    let dir = scratch("no-merges");
    copy_dir(&pipeline_dir().join("tokenizer"), &dir, &["merges.txt"]);
    let message = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(
        message.contains(&dir.join("merges.txt").display().to_string()),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn pad_token_outside_the_vocabulary_names_the_file_and_token() {
    let dir = scratch("bad-pad");
    copy_dir(
        &pipeline_dir().join("tokenizer_2"),
        &dir,
        &["tokenizer_config.json"],
    );
    let config =
        std::fs::read_to_string(pipeline_dir().join("tokenizer_2/tokenizer_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["pad_token"] = "<|notatoken|>".into();
    // transformers' legacy loading: special_tokens_map.json would override the config.
    std::fs::remove_file(dir.join("special_tokens_map.json")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let message = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(
        message.contains(&dir.join("tokenizer_config.json").display().to_string()),
        "{message}"
    );
    assert!(message.contains("<|notatoken|>"), "{message}");
    assert!(message.contains("pad_token"), "{message}");
    std::fs::remove_dir_all(dir).unwrap();
}
