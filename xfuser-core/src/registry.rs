//! The registry: components register themselves with `inventory::submit!` under their diffusers
//! class name, and loaders dispatch on the `_class_name` read from the config files.
//!
//! Kinds so far: pipelines, transformer backbones, schedulers, attention processors (layers
//! join them as they are built) and image classifiers. Attention processors are keyed by method
//! name ("serial", "ulysses", "ring", "usp") rather than a class name. Classifiers are
//! transformers models, keyed by the class their `config.json` names in `architectures[0]`
//! ("ViTForImageClassification") rather than by `_class_name`. Diffusers' remappings of old
//! class names (e.g. `Transformer2DModel` with `norm_type: "ada_norm_single"` is PixArt) are
//! registered as [`ClassAlias`] entries with a predicate on the config.

use std::path::Path;
use std::sync::Arc;

use crate::attention::AttentionProcessor;
use crate::backbone::{Backbone, PipelineStage, SpContext};
use crate::classifier::ImageClassifier;
use crate::distributed::TpRank;
use crate::engine::EngineConfig;
use crate::pipeline::DiffusionPipeline;
use crate::scheduler::Scheduler;
use crate::{Error, Result};

/// How a component is loaded: the folder it lives in (e.g. `model/transformer`) and numerics.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: candle_core::DType,
    pub device: candle_core::Device,
    /// A transformer for one PipeFusion stage: only that stage's weights. A loader that cannot
    /// split its model refuses it.
    pub stage: Option<PipelineStage>,
    /// A transformer for one tensor-parallel position: shard `tp.index` of `tp.size` of every
    /// split layer (the rest whole). Only loaders registered with
    /// [`TransformerEntry::tensor_parallel`] honour it; the default is the whole model.
    pub tp: TpRank,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: candle_core::DType::F32,
            device: candle_core::Device::Cpu,
            stage: None,
            tp: TpRank::serial(),
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
    /// What the parallel degrees are checked against, read from the parsed `config.json`
    /// alone (`file` is for errors), so that a configuration the model cannot split is
    /// refused before any weights are read.
    pub shape: fn(config: &serde_json::Value, file: &Path) -> Result<ModelShape>,
    /// Whether `load` honours [`LoadOptions::tp`] (the model splits its attention and
    /// feed-forward over a tensor-parallel group and its forward reads
    /// [`crate::backbone::ForwardContext::tp`]). The runtime refuses
    /// `--tensor-parallel-degree` > 1 for a model without it, naming the model.
    pub tensor_parallel: bool,
}

/// The sizes of a transformer that parallel degrees must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub num_attention_heads: usize,
    /// Blocks PipeFusion can split into stages.
    pub num_layers: usize,
}

/// A scheduler, built from its `scheduler_config.json` (already parsed; `file` is for errors).
pub struct SchedulerEntry {
    pub class_name: &'static str,
    pub from_config: fn(config: &serde_json::Value, file: &Path) -> Result<Box<dyn Scheduler>>,
}

/// A self-attention processor for sequence parallelism, keyed by method name and built for one
/// rank from its groups and the token split of one input shape (`build` checks that the
/// degrees fit the method).
pub struct AttentionProcessorEntry {
    pub name: &'static str,
    /// One line for `xfuser list`.
    pub description: &'static str,
    pub build: fn(sp: &SpContext) -> Result<Arc<dyn AttentionProcessor>>,
}

/// An image classifier (transformers' `*ForImageClassification`), built from its folder
/// (`config.json`, `model.safetensors`); keyed by `architectures[0]` of `config.json`.
pub struct ClassifierEntry {
    pub class_name: &'static str,
    /// Honours [`LoadOptions::stage`] (only the stage's layers; the embedding on the first,
    /// the head on the last) and [`LoadOptions::tp`] (the shard of every split layer).
    pub load: fn(dir: &Path, options: &LoadOptions) -> Result<Box<dyn ImageClassifier>>,
    /// The sizes the parallel degrees are checked against, from the parsed `config.json`
    /// alone (`file` is for errors), before any weights are read.
    pub shape: fn(config: &serde_json::Value, file: &Path) -> Result<ModelShape>,
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
    AttentionProcessor,
    Classifier,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pipeline => "pipeline",
            Kind::Transformer => "transformer",
            Kind::Scheduler => "scheduler",
            Kind::AttentionProcessor => "attention processor",
            Kind::Classifier => "classifier",
        }
    }
}

inventory::collect!(PipelineEntry);
inventory::collect!(TransformerEntry);
inventory::collect!(SchedulerEntry);
inventory::collect!(AttentionProcessorEntry);
inventory::collect!(ClassifierEntry);
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
        Kind::AttentionProcessor => inventory::iter::<AttentionProcessorEntry>
            .into_iter()
            .map(|e| e.name)
            .collect(),
        Kind::Classifier => inventory::iter::<ClassifierEntry>
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

pub fn classifier_entry(name: &str) -> Result<&'static ClassifierEntry> {
    inventory::iter::<ClassifierEntry>
        .into_iter()
        .find(|e| e.class_name == name)
        .ok_or_else(|| unknown(Kind::Classifier, name))
}

/// The classifier entry of the transformers model folder `dir`, by its `config.json`'s
/// `architectures[0]`, with the parsed config (for [`ClassifierEntry::shape`]).
pub fn classifier_of(dir: &Path) -> Result<(&'static ClassifierEntry, serde_json::Value)> {
    let file = dir.join("config.json");
    let config = crate::config::read_json_value(&file)?;
    let name = crate::config::architecture_of(&config, &file)?;
    Ok((classifier_entry(&name)?, config))
}

/// Loads the image classifier in folder `dir`, dispatching on its `config.json`.
pub fn load_classifier(dir: &Path, options: &LoadOptions) -> Result<Box<dyn ImageClassifier>> {
    (classifier_of(dir)?.0.load)(dir, options)
}

/// The [`ModelShape`] of the image classifier in folder `dir`, from its `config.json`.
pub fn classifier_shape(dir: &Path) -> Result<ModelShape> {
    let (entry, config) = classifier_of(dir)?;
    (entry.shape)(&config, &dir.join("config.json"))
}

pub fn attention_processor_entry(name: &str) -> Result<&'static AttentionProcessorEntry> {
    inventory::iter::<AttentionProcessorEntry>
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| unknown(Kind::AttentionProcessor, name))
}

/// Builds the attention processor registered as `name` for the rank and split of `sp`.
pub fn build_attention_processor(
    name: &str,
    sp: &SpContext,
) -> Result<Arc<dyn AttentionProcessor>> {
    (attention_processor_entry(name)?.build)(sp)
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

/// The [`ModelShape`] of the transformer in component folder `dir`, from its `config.json`.
pub fn transformer_shape(dir: &Path) -> Result<ModelShape> {
    let file = dir.join("config.json");
    let config = crate::config::read_json_value(&file)?;
    let name = crate::config::class_name_of(&config, &file)?;
    (transformer_entry(&name, &config)?.shape)(&config, &file)
}

/// Builds the scheduler described by `file` (a `scheduler_config.json`).
pub fn load_scheduler(file: &Path) -> Result<Box<dyn Scheduler>> {
    let config = crate::config::read_json_value(file)?;
    let name = crate::config::class_name_of(&config, file)?;
    (scheduler_entry(&name, &config)?.from_config)(&config, file)
}
