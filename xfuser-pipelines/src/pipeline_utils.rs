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
