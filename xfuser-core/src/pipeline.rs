//! The interface every registered pipeline offers to the CLI and to library users.

use crate::engine::{InputConfig, PipelineOutput};
use crate::Result;

pub trait DiffusionPipeline: Send + Sync {
    /// The diffusers class name, e.g. `PixArtAlphaPipeline`.
    fn class_name(&self) -> &'static str;

    /// Runs one generation request. `on_step(i, n)` reports denoising progress.
    fn generate(
        &self,
        input: &InputConfig,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<PipelineOutput>;
}
