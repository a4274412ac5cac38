//! DiT's pipeline (`DiTPipeline`), after diffusers' `pipelines/dit/pipeline_dit.py`:
//! class-conditional generation. A request's prompts are class names, looked up in the
//! `id2label` table of `model_index.json` (each comma-separated synonym is a name, as
//! diffusers' `DiTPipeline.labels`); classifier-free guidance, when the guidance scale is above
//! 1, pairs every image with the null class (`num_embeds_ada_norm`, 1000 for DiT-XL/2).
//!
//! This file says only what differs from the other models (the contract of
//! docs/model-contract.md): how a request becomes class labels, noise and a scheduler, and how
//! latents become images. The denoising loop, guidance and every parallel method (data, CFG,
//! Ulysses, Ring, USP, PipeFusion) are the runtime's ([`DiTRuntime`]).
//!
//! Where this port differs from diffusers' pipeline:
//! - `--height`/`--width` may differ from the trained size (diffusers always generates at
//!   `sample_size`·8, which stays the default here); the position embedding is then computed
//!   for the other grid, as diffusers' `PatchEmbed` does. diffusers' transformer can only
//!   unpatchify square latents; this one unpatchifies any grid.
//! - with guidance, diffusers steps the scheduler on both (equal) halves of the batch; the
//!   runtime steps one. The result is the same for the deterministic schedulers (DDIM,
//!   DPM-Solver); a stochastic one (DDPM) draws its noise for half as many rows.
//! - `--num-images-per-prompt` repeats each class, as the other pipelines repeat a prompt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use xfuser_core::backbone::{names, Backbone, Conditioning};
use xfuser_core::distributed::{CfgUse, ProcessGroup};
use xfuser_core::engine::{EngineConfig, InputConfig, PipelineOutput, RgbImage};
use xfuser_core::pipeline::DiffusionPipeline;
use xfuser_core::random::Generator;
use xfuser_core::registry::{load_scheduler, PipelineEntry};
use xfuser_core::{Error, Result};
use xfuser_pipelines::denoise::Guidance;
use xfuser_pipelines::image::{postprocess_u8, u8_to_rgb};
use xfuser_pipelines::pipeline_utils::read_model_index;
use xfuser_pipelines::runtime::{
    initial_latents, DenoiseJob, DenoisingPipeline, DiTRuntime, RunShape,
};
use xfuser_pipelines::vae::{AutoencoderKL, VaeConfig};

use crate::dit_transformer_2d;

pub const CLASS_NAME: &str = "DiTPipeline";

/// How many labels an error about an unknown one suggests.
const SUGGESTIONS: usize = 5;

/// The class names of a model: every synonym of `id2label`, each naming its class id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassLabels {
    labels: BTreeMap<String, usize>,
    classes: usize,
}

impl ClassLabels {
    /// Reads `id2label` from a parsed `model_index.json` (`file` for errors): an object of
    /// string class ids to comma-separated names. Names are trimmed; a name listed under two
    /// ids keeps the larger id, as diffusers' dict (filled in id order) does. Ids must be
    /// below `num_classes`. Absent: no labels (every prompt is then refused, saying so).
    pub fn from_model_index(
        index: &serde_json::Value,
        file: &Path,
        num_classes: usize,
    ) -> Result<Self> {
        let field_error = |message: String| Error::Config {
            file: file.to_path_buf(),
            field: "id2label".into(),
            message,
        };
        let Some(table) = index.get("id2label").filter(|v| !v.is_null()) else {
            return Ok(Self::default());
        };
        let table = table.as_object().ok_or_else(|| {
            field_error("expected an object of class ids to comma-separated names".into())
        })?;
        let mut entries = Vec::with_capacity(table.len());
        for (key, value) in table {
            let id: usize = key.trim().parse().map_err(|_| {
                field_error(format!(
                    "key `{key}` is not a class id (a whole number ≥ 0)"
                ))
            })?;
            if id >= num_classes {
                return Err(field_error(format!(
                    "class id {id} is not below the transformer's num_embeds_ada_norm \
                     ({num_classes} classes)"
                )));
            }
            let names = value.as_str().ok_or_else(|| {
                field_error(format!(
                    "the value of `{key}` must be a string of names, got {value}"
                ))
            })?;
            entries.push((id, names));
        }
        entries.sort_by_key(|(id, _)| *id);
        let mut labels = BTreeMap::new();
        for (id, names) in entries {
            for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                labels.insert(name.to_string(), id);
            }
        }
        Ok(Self {
            labels,
            classes: table.len(),
        })
    }

    /// The class id of `label`, or the one-line error a user reads: the label, where the
    /// names come from, and the closest valid names.
    pub fn id(&self, label: &str) -> Result<usize> {
        if let Some(&id) = self.labels.get(label.trim()) {
            return Ok(id);
        }
        if self.labels.is_empty() {
            return Err(Error::invalid(format!(
                "--prompt \"{label}\": DiTPipeline takes class names from model_index.json's \
                 `id2label`, and this model has none"
            )));
        }
        Err(Error::invalid(format!(
            "--prompt \"{label}\" is not a class name of this model (model_index.json \
             `id2label`: {} names of {} classes); closest: {}",
            self.labels.len(),
            self.classes,
            self.closest(label, SUGGESTIONS)
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// The `n` names nearest to `label` by edit distance (case-insensitive), ties by name.
    pub fn closest(&self, label: &str, n: usize) -> Vec<&str> {
        let wanted = label.trim().to_lowercase();
        let mut scored: Vec<(usize, &str)> = self
            .labels
            .keys()
            .map(|name| (edit_distance(&wanted, &name.to_lowercase()), name.as_str()))
            .collect();
        scored.sort();
        scored.into_iter().take(n).map(|(_, name)| name).collect()
    }

    /// Every name, sorted, with its class id.
    pub fn iter(&self) -> impl Iterator<Item = (&str, usize)> {
        self.labels.iter().map(|(k, &v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A loaded DiT pipeline.
pub struct DiTPipeline {
    runtime: DiTRuntime,
    vae: AutoencoderKL,
    scheduler_file: PathBuf,
    labels: ClassLabels,
    /// The null class: the label table's last row.
    null_class: usize,
    device: Device,
}

/// The DiT pipeline, named as xDiT names its pipelines.
#[allow(non_camel_case_types)]
pub type xFuserDiTPipeline = DiTPipeline;

/// What one request resolves to before any rank starts.
#[derive(Debug, Clone)]
pub struct DiTPlan {
    height: usize,
    width: usize,
    /// One class id per image: each prompt's, `num_images_per_prompt` times in a row.
    class_ids: Vec<u32>,
    cfg: bool,
}

impl DiTPipeline {
    /// Loads the diffusers folder `dir` (transformer, scheduler, vae and `id2label`).
    pub fn load(dir: &Path, engine: &EngineConfig) -> Result<Self> {
        // The schedulers and attention processors this pipeline finds by name must be linked.
        xfuser_pipelines::link_stock_registrations();
        let index = read_model_index(dir, CLASS_NAME, &["transformer", "scheduler", "vae"])?;
        let (dtype, device) = (engine.model.dtype, engine.model.device.clone());
        let transformer_config: dit_transformer_2d::Config =
            xfuser_core::config::read_json_config(&dir.join("transformer/config.json"))?;
        let num_classes = transformer_config.num_classes();
        let labels =
            ClassLabels::from_model_index(&index, &dir.join("model_index.json"), num_classes)?;
        // The degrees are checked against the configs before any weights are read.
        let vae_scale_factor = VaeConfig::load(&dir.join("vae/config.json"))?.vae_scale_factor();
        let runtime = DiTRuntime::load(
            &dir.join("transformer"),
            CLASS_NAME,
            &[dit_transformer_2d::CLASS_NAME],
            vae_scale_factor,
            engine,
        )?;
        let vae = AutoencoderKL::load(&dir.join("vae"), dtype, &device)?;
        let scheduler_file = dir.join("scheduler/scheduler_config.json");
        // Parsed now so that a bad or unregistered scheduler fails at load time.
        load_scheduler(&scheduler_file)?;
        Ok(Self {
            runtime,
            vae,
            scheduler_file,
            labels,
            null_class: num_classes,
            device,
        })
    }

    /// `DiTPipeline.from_pretrained(model)`: a folder or a Hub id.
    pub fn from_pretrained(engine: &EngineConfig) -> Result<Self> {
        let dir = xfuser_pipelines::hub::resolve_model(&engine.model.model)?;
        Self::load(&dir, engine)
    }

    /// The class names this model knows (diffusers' `pipe.labels`).
    pub fn labels(&self) -> &ClassLabels {
        &self.labels
    }

    /// diffusers' `get_label_ids`: the class id of each name.
    pub fn get_label_ids(&self, labels: &[String]) -> Result<Vec<usize>> {
        labels.iter().map(|l| self.labels.id(l)).collect()
    }

    /// The transformer (with PipeFusion: its first stage, which knows the model's facts).
    pub fn transformer(&self) -> &dyn Backbone {
        self.runtime.transformer()
    }

    fn class_tensor(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(Tensor::new(ids, &self.device)?)
    }
}

impl DenoisingPipeline for DiTPipeline {
    type Plan = DiTPlan;

    fn plan(&self, input: &InputConfig) -> Result<(RunShape, DiTPlan)> {
        input.validate(self.runtime.size_multiple())?;
        if !input.negative_prompt.is_empty() {
            return Err(Error::invalid(format!(
                "--negative-prompt \"{}\": DiTPipeline is class-conditional; the unconditional \
                 side of guidance is the null class, so it takes no negative prompt",
                input.negative_prompt
            )));
        }
        if let Some(n) = input.max_sequence_length {
            return Err(Error::invalid(format!(
                "--max-sequence-length {n}: DiTPipeline has no text encoder; leave it out"
            )));
        }
        let info = self.transformer().info();
        let default = info.sample_size * self.runtime.vae_scale_factor();
        let (height, width) = (
            input.height.unwrap_or(default),
            input.width.unwrap_or(default),
        );
        let mut class_ids = Vec::new();
        for id in self.get_label_ids(&input.prompts)? {
            let id = u32::try_from(id)
                .map_err(|_| Error::invalid(format!("class id {id} does not fit in 32 bits")))?;
            class_ids.extend(std::iter::repeat_n(id, input.num_images_per_prompt));
        }
        // diffusers' rule: guidance (and the null-class half) when the scale is above 1.
        let cfg = CfgUse::from_guidance_scale(input.guidance_scale);
        let shape = RunShape {
            height,
            width,
            batch: class_ids.len(),
            cfg: cfg.clone(),
        };
        let plan = DiTPlan {
            height,
            width,
            class_ids,
            cfg: cfg.is_on(),
        };
        Ok((shape, plan))
    }

    fn prepare(&self, plan: &DiTPlan, input: &InputConfig) -> Result<DenoiseJob> {
        let info = self.transformer().info();
        let scale = self.runtime.vae_scale_factor();
        let batch = plan.class_ids.len();
        let mut scheduler = load_scheduler(&self.scheduler_file)?;
        scheduler.set_timesteps(input.num_inference_steps)?;
        let mut generator = Generator::manual_seed(input.seed);
        let shape = (
            batch,
            info.in_channels,
            plan.height / scale,
            plan.width / scale,
        );
        // diffusers' DiTPipeline does not scale its noise by `init_noise_sigma` (1 for the
        // DDIM and DPM-Solver schedulers DiT ships with): neither does this port.
        let latents = initial_latents(input, shape, &mut generator, &self.device)?;
        let positive =
            Conditioning::new().with(names::CLASS_LABELS, self.class_tensor(&plan.class_ids)?);
        let negative = plan
            .cfg
            .then(|| -> Result<Conditioning> {
                let null = vec![self.null_class as u32; batch];
                Ok(Conditioning::new().with(names::CLASS_LABELS, self.class_tensor(&null)?))
            })
            .transpose()?;
        Ok(DenoiseJob {
            latents,
            guidance: Guidance {
                positive,
                negative,
                guidance_scale: input.guidance_scale,
            },
            scheduler,
            generator,
        })
    }

    /// `vae.decode(latents / scaling_factor)`, then to 8-bit RGB as diffusers' `numpy_to_pil`.
    fn decode(&self, _plan: &DiTPlan, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let images = self.vae.decode_latents(latents)?;
        u8_to_rgb(&postprocess_u8(&images)?)
    }

    /// As [`Self::decode`], the VAE decode split by rows over `group` (`--use-parallel-vae`).
    fn decode_parallel(
        &self,
        _plan: &DiTPlan,
        latents: &Tensor,
        group: &ProcessGroup,
    ) -> Result<Vec<RgbImage>> {
        match self.vae.decode_latents_parallel(latents, group)? {
            Some(images) => u8_to_rgb(&postprocess_u8(&images)?),
            None => Ok(Vec::new()),
        }
    }
}

impl DiffusionPipeline for DiTPipeline {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }

    fn generate(
        &self,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput> {
        self.runtime.generate(self, input, on_step)
    }
}

/// The registry's loader (also referenced by [`crate::link`]).
pub fn load_pipeline(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
    Ok(Box::new(DiTPipeline::load(dir, engine)?))
}

xfuser_core::inventory::submit! {
    PipelineEntry { class_name: CLASS_NAME, load: load_pipeline }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> ClassLabels {
        let index = serde_json::json!({
            "id2label": {
                "10": "later, twin",
                "2": "great white shark, white shark, Carcharodon carcharias",
                "1": "goldfish",
                "3": "twin"
            }
        });
        ClassLabels::from_model_index(&index, Path::new("model_index.json"), 1000).unwrap()
    }

    #[test]
    fn every_synonym_names_its_class() {
        let l = labels();
        assert_eq!(l.id("white shark").unwrap(), 2);
        assert_eq!(l.id(" Carcharodon carcharias ").unwrap(), 2);
        assert_eq!(l.id("goldfish").unwrap(), 1);
        // Listed under 3 and 10: the larger id wins, as diffusers' dict filled in id order.
        assert_eq!(l.id("twin").unwrap(), 10);
        assert_eq!(l.len(), 6);
    }

    #[test]
    fn an_unknown_label_lists_the_closest() {
        let err = labels().id("white sharc").unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("--prompt \"white sharc\""), "{err}");
        assert!(err.contains("id2label"), "{err}");
        assert!(err.contains("closest: \"white shark\""), "{err}");
        let err = ClassLabels::default().id("cat").unwrap_err().to_string();
        assert!(err.contains("has none"), "{err}");
    }

    #[test]
    fn a_bad_id2label_names_the_field() {
        let file = Path::new("model_index.json");
        for (table, needle) in [
            (serde_json::json!({"x": "cat"}), "`x`"),
            (serde_json::json!({"1000": "cat"}), "1000"),
            (serde_json::json!({"1": 3}), "must be a string"),
            (serde_json::json!(["cat"]), "expected an object"),
        ] {
            let index = serde_json::json!({ "id2label": table });
            let err = ClassLabels::from_model_index(&index, file, 1000)
                .unwrap_err()
                .to_string();
            assert!(err.contains("field `id2label`"), "{err}");
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
