//! The tiny PixArt-α pipeline compiled into the binary, so `xfuser generate` works on a fresh
//! machine with no model downloaded: `tests/fixtures/pipelines/tiny-pixart-shapes`, trained by
//! scripts/train_tiny_pixart.py to draw "a {colour} {shape} on a {colour} background" at 64 px
//! (circle, square, triangle; red, green, blue, yellow, white, black). docs/trained-model.md
//! says how it was trained and how well it draws.

use std::path::PathBuf;

use xfuser_core::{Error, Result};

use crate::request::GenerateParams;

macro_rules! bundle {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pipelines/tiny-pixart-shapes/",
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

/// The request defaults of the bundled model, where they differ from the general ones: it was
/// trained at one size, which has no aspect-ratio table (so no resolution binning), and is
/// sampled with its own step count and guidance (docs/trained-model.md).
pub fn bundled_defaults() -> GenerateParams {
    GenerateParams {
        num_inference_steps: BUNDLED_STEPS,
        guidance_scale: BUNDLED_GUIDANCE_SCALE,
        use_resolution_binning: false,
        ..GenerateParams::default()
    }
}

const BUNDLED_STEPS: usize = 20;
const BUNDLED_GUIDANCE_SCALE: f64 = 4.5;

/// The name the bundled model goes by in output file names and messages.
pub const BUNDLED_MODEL_NAME: &str = "tiny-pixart-shapes";

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
