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
