//! `xFuserPipeline::from_pretrained`: resolve a model (folder or Hub id), read its
//! `model_index.json` and build the pipeline registered under its `_class_name`.

use xfuser_core::engine::EngineConfig;
use xfuser_core::pipeline::DiffusionPipeline;
use xfuser_core::registry::load_pipeline;
use xfuser_core::Result;

use crate::hub::resolve_model;

/// The entry point for every registered pipeline, named after xDiT's.
#[allow(non_camel_case_types)]
pub struct xFuserPipeline;

impl xFuserPipeline {
    /// Builds the pipeline `engine.model.model` names (a diffusers folder or a Hub id).
    pub fn from_pretrained(engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
        engine.parallel.validate()?;
        crate::link_stock_registrations();
        let dir = resolve_model(&engine.model.model)?;
        load_pipeline(&dir, engine)
    }
}

/// Whether `model_index.json` names a component (`[library, class]`, not `[null, null]`, which
/// diffusers writes for an optional component left out).
pub fn has_component(index: &serde_json::Value, name: &str) -> bool {
    index
        .get(name)
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().any(|x| !x.is_null()))
}

/// Reads `dir/model_index.json` and checks that it names every component in `required`; the
/// error names the file, the missing component and `pipeline`, which needs it.
pub fn read_model_index(
    dir: &std::path::Path,
    pipeline: &str,
    required: &[&str],
) -> Result<serde_json::Value> {
    let file = dir.join("model_index.json");
    let index = xfuser_core::config::read_json_value(&file)?;
    if let Some(name) = required.iter().find(|n| !has_component(&index, n)) {
        return Err(xfuser_core::Error::Config {
            file,
            field: name.to_string(),
            message: format!("missing component `{name}` required by {pipeline}"),
        });
    }
    Ok(index)
}

/// `scheduler_config.json`'s dynamic-shift settings, read by the pipelines that compute the
/// shift `mu` themselves (SD3.5, Flux), as diffusers' `calculate_shift` reads them. Only the
/// default of `max_shift` differs between those pipelines (SD3 1.16, Flux 1.15).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct DynamicShift {
    #[serde(default)]
    use_dynamic_shifting: bool,
    #[serde(default = "default_base_image_seq_len")]
    base_image_seq_len: usize,
    #[serde(default = "default_max_image_seq_len")]
    max_image_seq_len: usize,
    #[serde(default = "default_base_shift")]
    base_shift: f64,
    max_shift: Option<f64>,
    #[serde(skip)]
    default_max_shift: f64,
}

fn default_base_image_seq_len() -> usize {
    256
}
fn default_max_image_seq_len() -> usize {
    4096
}
fn default_base_shift() -> f64 {
    0.5
}

impl DynamicShift {
    /// Reads `file` (a `scheduler_config.json`); `default_max_shift` stands in for a missing
    /// `max_shift`, as the pipeline's `calculate_shift` default does.
    pub fn read(file: &std::path::Path, default_max_shift: f64) -> Result<Self> {
        let mut shift: Self = xfuser_core::config::read_json_config(file)?;
        shift.default_max_shift = default_max_shift;
        Ok(shift)
    }

    /// `mu` for an image of `image_seq_len` tokens (linear between the base and max sequence
    /// lengths), or None when the schedule is not shifted dynamically.
    pub fn mu(&self, image_seq_len: usize) -> Option<f64> {
        if !self.use_dynamic_shifting {
            return None;
        }
        let max_shift = self.max_shift.unwrap_or(self.default_max_shift);
        let (x1, x2) = (
            self.base_image_seq_len as f64,
            self.max_image_seq_len as f64,
        );
        let m = (max_shift - self.base_shift) / (x2 - x1);
        let b = self.base_shift - m * x1;
        Some(image_seq_len as f64 * m + b)
    }
}
