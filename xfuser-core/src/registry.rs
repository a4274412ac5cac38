//! The registry: components register themselves with `inventory::submit!` under their diffusers
//! class name, and loaders dispatch on the `_class_name` read from the config files.
//!
//! Kinds so far: transformer backbones and schedulers (pipelines, attention processors and
//! layers join them as they are built). Diffusers' remappings of old class names (e.g.
//! `Transformer2DModel` with `norm_type: "ada_norm_single"` is PixArt) are registered as
//! [`ClassAlias`] entries with a predicate on the config.

use std::path::Path;

use crate::backbone::Backbone;
use crate::engine::EngineConfig;
use crate::pipeline::DiffusionPipeline;
use crate::scheduler::Scheduler;
use crate::{Error, Result};

/// How a component is loaded: the folder it lives in (e.g. `model/transformer`) and numerics.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: candle_core::DType,
    pub device: candle_core::Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: candle_core::DType::F32,
            device: candle_core::Device::Cpu,
        }
    }
}

/// A pipeline, built from a diffusers folder (`model_index.json` and the component folders).
pub struct PipelineEntry {
    pub class_name: &'static str,
    pub load: fn(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>>,
}

/// A transformer backbone, built from its component folder (`config.json` + weights).
pub struct TransformerEntry {
    pub class_name: &'static str,
    pub load: fn(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backbone>>,
}

/// A scheduler, built from its `scheduler_config.json` (already parsed; `file` is for errors).
pub struct SchedulerEntry {
    pub class_name: &'static str,
    pub from_config: fn(config: &serde_json::Value, file: &Path) -> Result<Box<dyn Scheduler>>,
}

/// An old or generic class name that stands for a registered one when `applies` holds on the
/// config (diffusers remaps such names when it loads).
pub struct ClassAlias {
    pub kind: Kind,
    pub alias: &'static str,
    pub target: &'static str,
    pub applies: fn(config: &serde_json::Value) -> bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pipeline,
    Transformer,
    Scheduler,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pipeline => "pipeline",
            Kind::Transformer => "transformer",
            Kind::Scheduler => "scheduler",
        }
    }
}

inventory::collect!(PipelineEntry);
inventory::collect!(TransformerEntry);
inventory::collect!(SchedulerEntry);
inventory::collect!(ClassAlias);

/// The class names registered for `kind`, sorted.
pub fn registered(kind: Kind) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = match kind {
        Kind::Pipeline => inventory::iter::<PipelineEntry>
            .into_iter()
            .map(|e| e.class_name)
            .collect(),
        Kind::Transformer => inventory::iter::<TransformerEntry>
            .into_iter()
            .map(|e| e.class_name)
            .collect(),
        Kind::Scheduler => inventory::iter::<SchedulerEntry>
            .into_iter()
            .map(|e| e.class_name)
            .collect(),
    };
    names.sort_unstable();
    names
}

/// The registered class that `name` (with its config) stands for, after aliases.
pub fn resolve_class_name<'a>(kind: Kind, name: &'a str, config: &serde_json::Value) -> &'a str {
    inventory::iter::<ClassAlias>
        .into_iter()
        .find(|a| a.kind == kind && a.alias == name && (a.applies)(config))
        .map_or(name, |a| a.target)
}

fn unknown(kind: Kind, name: &str) -> Error {
    Error::UnknownClass {
        kind: kind.as_str(),
        name: name.to_string(),
        registered: registered(kind).join(", "),
    }
}

pub fn pipeline_entry(name: &str, config: &serde_json::Value) -> Result<&'static PipelineEntry> {
    let target = resolve_class_name(Kind::Pipeline, name, config);
    inventory::iter::<PipelineEntry>
        .into_iter()
        .find(|e| e.class_name == target)
        .ok_or_else(|| unknown(Kind::Pipeline, name))
}

pub fn transformer_entry(
    name: &str,
    config: &serde_json::Value,
) -> Result<&'static TransformerEntry> {
    let target = resolve_class_name(Kind::Transformer, name, config);
    inventory::iter::<TransformerEntry>
        .into_iter()
        .find(|e| e.class_name == target)
        .ok_or_else(|| unknown(Kind::Transformer, name))
}

pub fn scheduler_entry(name: &str, config: &serde_json::Value) -> Result<&'static SchedulerEntry> {
    let target = resolve_class_name(Kind::Scheduler, name, config);
    inventory::iter::<SchedulerEntry>
        .into_iter()
        .find(|e| e.class_name == target)
        .ok_or_else(|| unknown(Kind::Scheduler, name))
}

/// Loads the pipeline in folder `dir`, dispatching on its `model_index.json`.
pub fn load_pipeline(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
    let file = dir.join("model_index.json");
    let config = crate::config::read_json_value(&file)?;
    let name = crate::config::class_name_of(&config, &file)?;
    (pipeline_entry(&name, &config)?.load)(dir, engine)
}

/// Loads the transformer in component folder `dir`, dispatching on its `config.json`.
pub fn load_transformer(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backbone>> {
    let file = dir.join("config.json");
    let config = crate::config::read_json_value(&file)?;
    let name = crate::config::class_name_of(&config, &file)?;
    (transformer_entry(&name, &config)?.load)(dir, options)
}

/// Builds the scheduler described by `file` (a `scheduler_config.json`).
pub fn load_scheduler(file: &Path) -> Result<Box<dyn Scheduler>> {
    let config = crate::config::read_json_value(file)?;
    let name = crate::config::class_name_of(&config, file)?;
    (scheduler_entry(&name, &config)?.from_config)(&config, file)
}
