//! Where a model comes from: a local diffusers folder, or a Hugging Face Hub id resolved in the
//! local Hugging Face cache and downloaded (with the `hf-hub` crate) when it is not cached.
//!
//! The cache lookup is written here rather than taken from `hf-hub` because we need the whole
//! snapshot folder (every component), honour `HF_HUB_CACHE`, and must be able to say exactly
//! which directories were searched when a model is missing.

use std::path::{Path, PathBuf};

use xfuser_core::{Error, Result};

/// The Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`, as huggingface_hub resolves it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = non_empty_env("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = non_empty_env("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = non_empty_env("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// True when `HF_HUB_OFFLINE` forbids network access (1/true/yes/on, as huggingface_hub).
pub fn hub_offline() -> bool {
    non_empty_env("HF_HUB_OFFLINE")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Resolves `model` (a folder path or a Hub id such as `PixArt-alpha/PixArt-XL-2-1024-MS`) to
/// a local folder that holds `model_index.json`.
pub fn resolve_model(model: &str) -> Result<PathBuf> {
    resolve_model_in(model, &hub_cache_dir(), hub_offline())
}

/// [`resolve_model`] with the cache folder and the offline switch given explicitly.
pub fn resolve_model_in(model: &str, cache: &Path, offline: bool) -> Result<PathBuf> {
    let local = Path::new(model);
    if local.is_dir() {
        let index = local.join("model_index.json");
        if !index.is_file() {
            return Err(Error::invalid(format!(
                "{}: not a diffusers pipeline folder (no model_index.json)",
                local.display()
            )));
        }
        return Ok(local.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(Error::invalid(format!(
            "model `{model}`: no such folder, and not a Hub id of the form `org/name`"
        )));
    }
    let repo_dir = cache.join(format!("models--{}", model.replace('/', "--")));
    if let Some(snapshot) = cached_snapshot(&repo_dir) {
        return Ok(snapshot);
    }
    if offline {
        return Err(Error::invalid(format!(
            "model `{model}` is not a local folder and is not in the Hugging Face cache \
             (searched {} for refs/main and snapshots/*/model_index.json; cache root from \
             HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), and HF_HUB_OFFLINE \
             forbids downloading it",
            repo_dir.display()
        )));
    }
    download(model, cache)
}

fn is_hub_id(model: &str) -> bool {
    let mut parts = model.split('/');
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if valid(a) && valid(b))
}

/// The snapshot `refs/main` points at, or else the only snapshot, if it has model_index.json.
fn cached_snapshot(repo_dir: &Path) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    let by_ref = std::fs::read_to_string(repo_dir.join("refs/main"))
        .ok()
        .map(|rev| snapshots.join(rev.trim()));
    let candidates: Vec<PathBuf> = match by_ref {
        Some(dir) => vec![dir],
        None => std::fs::read_dir(&snapshots)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect(),
    };
    match candidates.as_slice() {
        [one] if one.join("model_index.json").is_file() => Some(one.clone()),
        _ => None,
    }
}

/// Downloads the files a pipeline needs (configs, tokenizer files, safetensors weights of the
/// components listed in model_index.json) into the cache and returns the snapshot folder.
fn download(model: &str, cache: &Path) -> Result<PathBuf> {
    let hub_error = |what: &str, e: hf_hub::api::sync::ApiError| {
        Error::invalid(format!(
            "model `{model}`: {what} from the Hugging Face Hub failed: {e}"
        ))
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(false)
        .build()
        .map_err(|e| hub_error("connecting", e))?;
    let repo = api.model(model.to_string());
    let index = repo
        .get("model_index.json")
        .map_err(|e| hub_error("downloading model_index.json", e))?;
    let components = component_folders(&index)?;
    let info = repo.info().map_err(|e| hub_error("listing files", e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    for file in files_to_fetch(&files, &components) {
        repo.get(&file)
            .map_err(|e| hub_error(&format!("downloading {file}"), e))?;
    }
    index
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::invalid(format!("{}: no parent folder", index.display())))
}

fn component_folders(index: &Path) -> Result<Vec<String>> {
    let value = xfuser_core::config::read_json_value(index)?;
    let map = value.as_object().ok_or_else(|| Error::Config {
        file: index.to_path_buf(),
        field: ".".into(),
        message: "expected a JSON object".into(),
    })?;
    Ok(map
        .iter()
        .filter(|(k, v)| !k.starts_with('_') && v.is_array())
        .map(|(k, _)| k.clone())
        .collect())
}

/// The repository files a pipeline needs: per component folder its JSON configs, tokenizer
/// files and safetensors weights, skipping precision variants (`*.fp16.safetensors`) when the
/// plain file exists. Other weight formats (.bin, .ckpt, .onnx, ...) are never fetched.
pub fn files_to_fetch(files: &[String], components: &[String]) -> Vec<String> {
    let wanted_ext = [".json", ".safetensors", ".model", ".txt"];
    files
        .iter()
        .filter(|f| {
            let Some((folder, name)) = f.split_once('/') else {
                return false;
            };
            if !components.iter().any(|c| c == folder) || name.contains('/') {
                return false;
            }
            if !wanted_ext.iter().any(|e| name.ends_with(e)) {
                return false;
            }
            match variant_base(name) {
                Some(base) => !files.contains(&format!("{folder}/{base}")),
                None => true,
            }
        })
        .cloned()
        .collect()
}

/// `model.fp16.safetensors` -> `model.safetensors` (likewise for sharded names).
fn variant_base(name: &str) -> Option<String> {
    ["fp16", "bf16", "fp32"].iter().find_map(|v| {
        let marker = format!(".{v}.");
        name.contains(&marker)
            .then(|| name.replacen(&marker, ".", 1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xfuser-hub-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn cached_model_resolves_through_refs_main() {
        let cache = temp_dir("cache");
        let repo = cache.join("models--org--tiny");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("model_index.json"), "{}").unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let resolved = resolve_model_in("org/tiny", &cache, true).unwrap();
        assert_eq!(resolved, snap);
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn offline_miss_names_the_searched_directory() {
        let cache = temp_dir("empty");
        let err = resolve_model_in("org/absent", &cache, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("models--org--absent"), "{err}");
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn non_id_non_folder_is_rejected() {
        let err = resolve_model_in("/no/such/folder", Path::new("/nonexistent"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such folder"), "{err}");
    }

    #[test]
    fn fetch_list_keeps_configs_tokenizer_and_plain_safetensors() {
        let files: Vec<String> = [
            "model_index.json",
            "README.md",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "transformer/diffusion_pytorch_model.fp16.safetensors",
            "transformer/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "tokenizer/spiece.model",
            "tokenizer/tokenizer_config.json",
            "other/config.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let components: Vec<String> = ["transformer", "vae", "tokenizer"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let fetched = files_to_fetch(&files, &components);
        assert_eq!(
            fetched,
            [
                "transformer/config.json",
                "transformer/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.fp16.safetensors",
                "vae/config.json",
                "tokenizer/spiece.model",
                "tokenizer/tokenizer_config.json",
            ]
        );
    }
}
