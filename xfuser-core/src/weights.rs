//! Locating and opening the safetensors weights of a diffusers component folder, single-file or
//! sharded, with errors that name the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The weight files of one component: `{stem}.safetensors`, or the shards listed in
/// `{stem}.safetensors.index.json`. `source` is what errors name (the file, or the index).
#[derive(Debug, Clone)]
pub struct WeightFiles {
    pub source: PathBuf,
    pub files: Vec<PathBuf>,
}

impl WeightFiles {
    /// Finds the weights called `stem` (e.g. `diffusion_pytorch_model`, `model`) in `dir`.
    pub fn find(dir: &Path, stem: &str) -> Result<Self> {
        let single = dir.join(format!("{stem}.safetensors"));
        if single.is_file() {
            return Ok(Self {
                source: single.clone(),
                files: vec![single],
            });
        }
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            let files = shard_files(&index, dir)?;
            return Ok(Self {
                source: index,
                files,
            });
        }
        Err(Error::Weights {
            file: dir.to_path_buf(),
            message: format!(
                "no weights found: expected {stem}.safetensors or {stem}.safetensors.index.json"
            ),
        })
    }

    /// Opens the files (memory-mapped) as a VarBuilder. A file that is not valid safetensors
    /// (truncated, corrupt) is named in the error.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        for file in &self.files {
            // SAFETY: the file is mapped read-only; like every mmap user we rely on nobody
            // truncating it while the model is alive.
            unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(|e| {
                Error::Weights {
                    file: file.clone(),
                    message: format!("not a readable safetensors file: {e}"),
                }
            })?;
        }
        // SAFETY: as above.
        unsafe { VarBuilder::from_mmaped_safetensors(&self.files, dtype, device) }
            .map_err(|e| self.error(e))
    }

    /// As [`var_builder`](Self::var_builder), and a counter of the bytes of the tensors the
    /// model actually fetched (in `dtype`): what a partial load (a PipeFusion stage) holds.
    pub fn counting_var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarBuilder<'static>, LoadedBytes)> {
        // Opened once through the checked path so that a bad file is named in the error.
        self.var_builder(dtype, device)?;
        // SAFETY: as in `var_builder`.
        let inner = unsafe { MmapedSafetensors::multi(&self.files) }.map_err(|e| self.error(e))?;
        let loaded = LoadedBytes::default();
        let backend = CountingBackend {
            inner,
            loaded: loaded.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        Ok((vb, loaded))
    }

    /// Wraps an error raised while building a model from these weights (a missing tensor, a
    /// tensor of the wrong shape) with the weights' file name.
    pub fn error(&self, err: candle_core::Error) -> Error {
        Error::Weights {
            file: self.source.clone(),
            message: crate::error::candle_message(&err),
        }
    }
}

/// Bytes of the tensors fetched through a [`WeightFiles::counting_var_builder`]; clones share
/// the count.
#[derive(Debug, Clone, Default)]
pub struct LoadedBytes(Arc<AtomicU64>);

impl LoadedBytes {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, tensor: &Tensor) {
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

struct CountingBackend {
    inner: MmapedSafetensors,
    loaded: LoadedBytes,
}

impl SimpleBackend for CountingBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        hints: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = SimpleBackend::get(&self.inner, shape, name, hints, dtype, dev)?;
        self.loaded.add(&tensor);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get_unchecked(name, dtype, dev)?;
        self.loaded.add(&tensor);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

fn shard_files(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let parsed: ShardIndex = crate::config::read_json_config(index)?;
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::Weights {
            file: index.to_path_buf(),
            message: format!(
                "shard {} listed in weight_map does not exist",
                missing.display()
            ),
        });
    }
    Ok(files)
}
