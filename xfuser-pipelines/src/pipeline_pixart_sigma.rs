//! PixArt-Σ (`PixArtSigmaPipeline`): the PixArt-α pipeline with a 300-token default text
//! length, the 2048-px aspect-ratio table, and no micro-conditioning.

use std::path::Path;

use xfuser_core::engine::EngineConfig;
use xfuser_core::pipeline::DiffusionPipeline;
use xfuser_core::registry::PipelineEntry;
use xfuser_core::Result;

use crate::pipeline_pixart_alpha::{PixArtPipeline, PixArtSpec};

pub static PIXART_SIGMA: PixArtSpec = PixArtSpec {
    class_name: "PixArtSigmaPipeline",
    default_max_sequence_length: 300,
    bins: crate::binning::pixart_sigma_bins,
    micro_conditioning: false,
};

/// The PixArt-Σ pipeline, named as xDiT's.
#[allow(non_camel_case_types)]
pub struct xFuserPixArtSigmaPipeline;

impl xFuserPixArtSigmaPipeline {
    /// `PixArtSigmaPipeline.from_pretrained(model)`: a folder or a Hub id.
    pub fn from_pretrained(engine: &EngineConfig) -> Result<PixArtPipeline> {
        let dir = crate::hub::resolve_model(&engine.model.model)?;
        PixArtPipeline::load(&PIXART_SIGMA, &dir, engine)
    }
}

fn load_sigma(dir: &Path, engine: &EngineConfig) -> Result<Box<dyn DiffusionPipeline>> {
    Ok(Box::new(PixArtPipeline::load(&PIXART_SIGMA, dir, engine)?))
}

xfuser_core::inventory::submit! {
    PipelineEntry { class_name: "PixArtSigmaPipeline", load: load_sigma }
}
