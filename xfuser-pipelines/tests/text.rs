//! Parity of the PixArt text side with transformers 5.23: token ids and masks from both kinds of
//! tokenizer folder, the T5 encoder's outputs on a padded masked batch, and errors that name the
//! file. Fixtures: `scripts/fixtures/text.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use xfuser_core::testing::{fixtures_dir, load_goldens, max_abs_diff, rel_l2};
use xfuser_pipelines::text::t5::relative_position_bucket;
use xfuser_pipelines::text::{T5EncoderModel, T5Tokenizer};

fn text_dir() -> PathBuf {
    fixtures_dir().join("text")
}

fn prompts() -> Vec<String> {
    let text = std::fs::read_to_string(text_dir().join("prompts.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn goldens(name: &str) -> HashMap<String, Tensor> {
    load_goldens(&text_dir().join(name)).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

/// A fresh scratch folder under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xfuser-text-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn check_tokens(tokenizer: &T5Tokenizer, golden_folder: &str) {
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let goldens = goldens("tokens.safetensors");
    for n in [16, 32] {
        let batch = tokenizer.encode_batch(&prompts, n, &Device::Cpu).unwrap();
        let ids = rows(&batch.input_ids);
        let mask = rows(&batch.attention_mask);
        let want_ids = rows(&goldens[&format!("{golden_folder}.L{n}.input_ids")]);
        let want_mask = rows(&goldens[&format!("{golden_folder}.L{n}.attention_mask")]);
        for (i, prompt) in prompts.iter().enumerate() {
            assert_eq!(ids[i], want_ids[i], "ids of {prompt:?} at max_length {n}");
            assert_eq!(
                mask[i], want_mask[i],
                "mask of {prompt:?} at max_length {n}"
            );
        }
    }
}

#[test]
fn tokenizer_json_matches_transformers() {
    let tokenizer = T5Tokenizer::from_dir(&text_dir().join("tokenizer")).unwrap();
    assert_eq!(tokenizer.vocab_size(), 100);
    check_tokens(&tokenizer, "tokenizer");
}

/// tokenizer/'s tokenizer.json and config with, beside them, the spiece.model it was converted
/// from (a diffusers folder saved by transformers 4 has both).
fn full_tokenizer_folder(name: &str) -> PathBuf {
    let dir = scratch(name);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(text_dir().join("tokenizer").join(file), dir.join(file)).unwrap();
    }
    let spiece = text_dir().join("tokenizer_spiece/spiece.model");
    std::fs::copy(spiece, dir.join("spiece.model")).unwrap();
    dir
}

#[test]
fn spiece_conversion_matches_tokenizer_json() {
    // Same spiece.model and config as the tokenizer.json: the conversion must give what
    // transformers saved.
    let dir = full_tokenizer_folder("both");
    let tokenizer = T5Tokenizer::from_spiece(&dir).unwrap();
    assert_eq!(tokenizer.vocab_size(), 100);
    check_tokens(&tokenizer, "tokenizer");
}

#[test]
fn tokenizer_json_is_preferred_over_spiece_model() {
    let dir = full_tokenizer_folder("prefer-json");
    std::fs::write(dir.join("spiece.model"), b"not a model").unwrap();
    let tokenizer = T5Tokenizer::from_dir(&dir).unwrap();
    check_tokens(&tokenizer, "tokenizer");
}

#[test]
fn tokenizer_json_pipeline_is_replaced_by_t5s() {
    // transformers 5's T5Tokenizer keeps only the vocabulary, charsmap and added tokens of a
    // tokenizer.json: a transformers-4-style file (as text.py's `legacy_tokenizer_json`) must
    // tokenize as the original.
    let dir = scratch("legacy-json");
    let src = text_dir().join("tokenizer");
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let precompiled = json["normalizer"].take();
    json["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
        precompiled,
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
    ]});
    json["pre_tokenizer"] = serde_json::json!({
        "type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false,
    });
    json["post_processor"] = serde_json::Value::Null;
    json["model"]["unk_id"] = 0.into();
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    let tokenizer = T5Tokenizer::from_dir(&dir).unwrap();
    check_tokens(&tokenizer, "tokenizer");
}

#[test]
fn spiece_only_folder_matches_transformers() {
    // PixArt's layout: spiece.model + tokenizer_config.json with 100 sentinel ids.
    let tokenizer = T5Tokenizer::from_dir(&text_dir().join("tokenizer_spiece")).unwrap();
    assert_eq!(tokenizer.vocab_size(), 200);
    assert_eq!(tokenizer.inner().token_to_id("<extra_id_0>"), Some(199));
    check_tokens(&tokenizer, "tokenizer_spiece");
}

#[test]
fn truncation_keeps_eos_last() {
    let tokenizer = T5Tokenizer::from_dir(&text_dir().join("tokenizer")).unwrap();
    let long = prompts()[6].clone();
    for n in [1, 2, 5] {
        let ids = tokenizer.encode(&long, n).unwrap();
        assert_eq!(ids.len(), n);
        assert_eq!(*ids.last().unwrap(), 1, "</s> last at max_length {n}");
    }
    assert!(tokenizer.encode("a", 0).is_err());
}

#[test]
fn relative_position_buckets_match_transformers() {
    let goldens = goldens("buckets.safetensors");
    for (num_buckets, max_distance) in [(8, 12), (32, 128)] {
        let key = format!("b{num_buckets}_d{max_distance}");
        let rel = goldens[&format!("{key}.relative_position")]
            .to_vec1::<i64>()
            .unwrap();
        let want = goldens[&format!("{key}.bucket")].to_vec1::<i64>().unwrap();
        for (r, w) in rel.iter().zip(want) {
            let got = relative_position_bucket(*r, num_buckets, max_distance);
            assert_eq!(got as i64, w, "{key}: relative position {r}");
        }
    }
}

fn check_encoder(name: &str) {
    let goldens = goldens("encoder.safetensors");
    let ids = &goldens[&format!("{name}.input_ids")];
    let mask = &goldens[&format!("{name}.attention_mask")];
    let want = &goldens[&format!("{name}.last_hidden_state")];
    let want_unmasked = &goldens[&format!("{name}.last_hidden_state_unmasked")];
    let encoder =
        T5EncoderModel::from_dir(&text_dir().join(name), DType::F32, &Device::Cpu).unwrap();

    // The ids the goldens were computed from are the tokenizer's (u32 here, i64 there).
    let tokenizer = T5Tokenizer::from_dir(&text_dir().join("tokenizer")).unwrap();
    let p = prompts();
    let batch = tokenizer
        .encode_batch(&[&p[0], &p[4], &p[6], &p[2]], 32, &Device::Cpu)
        .unwrap();
    assert_eq!(rows(&batch.input_ids), rows(ids));
    assert_eq!(rows(&batch.attention_mask), rows(mask));

    let got = encoder
        .forward(&batch.input_ids, Some(&batch.attention_mask))
        .unwrap();
    let err = rel_l2(&got, want).unwrap();
    // The same on the tokens only (what the transformer's own mask lets through).
    let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let err_tokens = rel_l2(
        &got.broadcast_mul(&keep).unwrap(),
        &want.broadcast_mul(&keep).unwrap(),
    )
    .unwrap();
    let err_unmasked = rel_l2(&encoder.forward(ids, None).unwrap(), want_unmasked).unwrap();
    println!(
        "{name}: rel L2 all positions {err:.2e}, tokens only {err_tokens:.2e}, no mask \
         {err_unmasked:.2e}, max abs {:.2e}",
        max_abs_diff(&got, want).unwrap()
    );
    assert!(err <= 1e-5, "{name}: rel L2 {err:e} over all positions");
    assert!(
        err_tokens <= 1e-5,
        "{name}: rel L2 {err_tokens:e} on tokens"
    );
    assert!(
        err_unmasked <= 1e-5,
        "{name}: rel L2 {err_unmasked:e} without mask"
    );
}

#[test]
fn gated_gelu_encoder_matches_transformers() {
    check_encoder("t5_gated");
}

#[test]
fn relu_encoder_matches_transformers() {
    check_encoder("t5_relu");
}

fn error_of<T: std::fmt::Debug>(r: xfuser_core::Result<T>) -> String {
    let err = r.unwrap_err().to_string();
    println!("error: {err}");
    err
}

#[test]
fn missing_tokenizer_files_name_the_folder() {
    let dir = scratch("empty-tokenizer");
    let err = error_of(T5Tokenizer::from_dir(&dir));
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(
        err.contains("tokenizer.json") && err.contains("spiece.model"),
        "{err}"
    );
    let err = error_of(T5Tokenizer::from_spiece(&dir));
    assert!(
        err.contains(&dir.join("spiece.model").display().to_string()),
        "{err}"
    );
}

#[test]
fn corrupt_tokenizer_files_are_named() {
    let dir = scratch("truncated-spiece");
    let bytes = std::fs::read(text_dir().join("tokenizer_spiece/spiece.model")).unwrap();
    let spiece = dir.join("spiece.model");
    std::fs::write(&spiece, &bytes[..bytes.len() / 2]).unwrap();
    let err = error_of(T5Tokenizer::from_dir(&dir));
    assert!(err.contains(&spiece.display().to_string()), "{err}");
    assert!(err.contains("truncated"), "{err}");

    let json = dir.join("tokenizer.json");
    std::fs::write(&json, "{\"version\": ").unwrap();
    let err = error_of(T5Tokenizer::from_dir(&dir));
    assert!(err.contains(&json.display().to_string()), "{err}");
}

fn copy_model(name: &str, to: &Path) {
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(text_dir().join(name).join(file), to.join(file)).unwrap();
    }
}

#[test]
fn missing_tensor_names_the_weights_file_and_tensor() {
    let dir = scratch("missing-tensor");
    copy_model("t5_gated", &dir);
    let weights = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let gone = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight";
    tensors.remove(gone).unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = error_of(T5EncoderModel::from_dir(&dir, DType::F32, &Device::Cpu));
    assert!(err.contains(&weights.display().to_string()), "{err}");
    assert!(err.contains(gone), "{err}");
}

#[test]
fn bad_encoder_config_names_file_and_field() {
    let dir = scratch("bad-config");
    copy_model("t5_relu", &dir);
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "\"feed_forward_proj\": \"relu\"",
        "\"feed_forward_proj\": \"gated-foo\"",
    );
    std::fs::write(&config, text).unwrap();
    let err = error_of(T5EncoderModel::from_dir(&dir, DType::F32, &Device::Cpu));
    assert!(err.contains(&config.display().to_string()), "{err}");
    assert!(err.contains("feed_forward_proj"), "{err}");

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(&config, "{}").unwrap();
    let err = error_of(T5EncoderModel::from_dir(&dir, DType::F32, &Device::Cpu));
    assert!(err.contains("model.safetensors"), "{err}");
}
