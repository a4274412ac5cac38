//! The tiny PixArt-α pipeline compiled into the binary, so `xfuser generate` works on a fresh
//! machine with no model downloaded. Its weights are random (it is the test fixture
//! `tests/fixtures/pipelines/tiny-pixart-alpha`): the pictures it makes are noise-like, but
//! every stage of the real pipeline runs on them.

use std::path::PathBuf;

use xfuser_core::{Error, Result};

macro_rules! bundle {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pipelines/tiny-pixart-alpha/",
            $path
        )) as &[u8])),*]
    };
}

const FILES: &[(&str, &[u8])] = bundle!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// The name the bundled model goes by in output file names and messages.
pub const BUNDLED_MODEL_NAME: &str = "tiny-pixart-alpha";

/// Writes the bundled pipeline into the temporary directory (once per content version) and
/// returns its folder. The folder appears atomically: it is written under a private name and
/// renamed into place, so a concurrent or interrupted run never sees half of it.
pub fn bundled_model_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("xfuser-{BUNDLED_MODEL_NAME}-{:016x}", digest()));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let staging = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    for (name, bytes) in FILES {
        let path = staging.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    match std::fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        // Another process put it in place first; theirs is identical.
        Err(_) if dir.join("model_index.json").is_file() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(dir)
        }
        Err(e) => Err(Error::io(&dir, e)),
    }
}

/// FNV-1a over every file name and byte: a new bundle gets a new folder.
fn digest() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.as_bytes().iter().chain(bytes.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
