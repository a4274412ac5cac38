//! Helpers for the parity tests of every crate: where the committed fixtures are, how to read
//! a golden file, the relative L2 error the tolerances are stated in, and scratch folders.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::backbone::{BackboneInputs, Conditioning};
use crate::{Error, Result};

/// The tensors of a golden file that hold a backbone forward's inputs: `hidden_states`,
/// `timestep`, and the conditioning (every other tensor named in `conditioning_names` that
/// the file has). Dereferences to the file's tensors.
pub struct ForwardCase {
    pub tensors: HashMap<String, Tensor>,
    pub conditioning: Conditioning,
}

impl ForwardCase {
    pub fn new(tensors: HashMap<String, Tensor>, conditioning_names: &[&str]) -> Self {
        let mut conditioning = Conditioning::new();
        for name in conditioning_names {
            if let Some(t) = tensors.get(*name) {
                conditioning.insert(*name, t.clone());
            }
        }
        Self {
            tensors,
            conditioning,
        }
    }

    /// The forward's inputs; panics when the file lacks `hidden_states` or `timestep`.
    pub fn inputs(&self) -> BackboneInputs<'_> {
        BackboneInputs {
            hidden_states: &self.tensors["hidden_states"],
            timestep: &self.tensors["timestep"],
            conditioning: &self.conditioning,
        }
    }
}

impl std::ops::Deref for ForwardCase {
    type Target = HashMap<String, Tensor>;

    fn deref(&self) -> &Self::Target {
        &self.tensors
    }
}

/// `tests/fixtures/` at the workspace root.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Every tensor of a safetensors golden file, on the CPU, in the dtype it was saved in.
pub fn load_goldens(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Weights {
        file: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// ‖a − b‖₂ / ‖b‖₂, computed in f64; `b` is the reference. Shapes must match.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::invalid(format!(
            "rel_l2: shapes differ, {:?} vs reference {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm == 0.0 { diff } else { diff / norm })
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    Ok((a - b)?.abs()?.max(0)?.to_scalar::<f64>()?)
}

/// Copies the folder `from` into `to` (created), recursively: tests that break a fixture do it
/// on a copy.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    Ok(())
}

/// Entry `name` of a `cases.json` golden index (`file`), read into `T`.
pub fn read_case<T: serde::de::DeserializeOwned>(file: &Path, name: &str) -> Result<T> {
    let all: serde_json::Value = crate::config::read_json_value(file)?;
    let case = all
        .get(name)
        .ok_or_else(|| Error::invalid(format!("{}: no case named {name:?}", file.display())))?;
    crate::config::json_value_config(case, file)
}

/// Largest per-pixel difference, in [0, 1] units, between 8-bit images and a reference
/// (B, H, W, 3) tensor in [0, 1] (diffusers' `output_type="np"`); an error when the count or
/// sizes differ.
pub fn images_max_abs_diff(images: &[crate::engine::RgbImage], reference: &Tensor) -> Result<f64> {
    let (b, h, w, c) = reference.dims4()?;
    if images.len() != b || c != 3 || images.iter().any(|i| (i.height, i.width) != (h, w)) {
        return Err(Error::invalid(format!(
            "{} images of sizes {:?} against a reference {:?}",
            images.len(),
            images
                .iter()
                .map(|i| (i.height, i.width))
                .collect::<Vec<_>>(),
            reference.dims()
        )));
    }
    let pixels: Vec<u8> = images.iter().flat_map(|i| i.data.iter().copied()).collect();
    let ours =
        (Tensor::from_vec(pixels, (b, h, w, 3), &Device::Cpu)?.to_dtype(DType::F64)? / 255.0)?;
    max_abs_diff(&ours, reference)
}

/// A fresh folder under the system temp dir for one test, named after `tag`, the process and a
/// counter (tests of one binary run in parallel), removed with its contents when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates the folder; a test that cannot have one cannot run, so this panics then.
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("xfuser-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create the test folder {}: {e}", dir.display());
        }
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
