//! xfuser-pipelines: pipelines, one file per diffusers pipeline, and the denoising loop they
//! share; image classification on the dp × tp × pp layout (`classify`).

pub mod binning;
pub mod classify;
pub mod denoise;
pub mod hub;
pub mod image;
pub mod image_processing;
pub mod parallel_vae;
pub mod pipefusion;
pub mod pipeline_flux;
pub mod pipeline_pixart_alpha;
pub mod pipeline_pixart_sigma;
pub mod pipeline_stable_diffusion_3;
pub mod pipeline_utils;
pub mod runtime;
pub mod step_cache;
pub mod text;
pub mod vae;

pub use pipeline_flux::xFuserFluxPipeline;
pub use pipeline_pixart_alpha::{xFuserPixArtAlphaPipeline, PixArtPipeline};
pub use pipeline_pixart_sigma::xFuserPixArtSigmaPipeline;
pub use pipeline_stable_diffusion_3::xFuserStableDiffusion3Pipeline;
pub use pipeline_utils::xFuserPipeline;

/// Keeps the registrations of the stock schedulers and attention processors in every binary
/// that calls it, and returns the scheduler class names.
///
/// Components register themselves with `inventory::submit!`, in statics of the module that
/// submits them; the linker only pulls the object files of a library that resolve a symbol the
/// binary uses. xfuser-schedulers and the attention processors of xfuser-layers are reached
/// only through the registry, by name, so a binary that never names them (a plugin's test, a
/// program that loads a pipeline through `xfuser_core::registry`) could link without them and
/// find no `DDIMScheduler` or `ulysses`. Referencing one function of each registering module
/// links that module. [`xFuserPipeline::from_pretrained`] calls this; so does any loader of an
/// out-of-tree pipeline (docs/adding-models.md).
pub fn link_stock_registrations() -> &'static [&'static str] {
    use std::hint::black_box;
    use xfuser_schedulers as s;
    black_box(s::DDIMScheduler::from_config as fn(_, _) -> _);
    black_box(s::DDPMScheduler::from_config as fn(_, _) -> _);
    black_box(s::DPMSolverMultistepScheduler::from_config as fn(_, _) -> _);
    black_box(s::EulerDiscreteScheduler::from_config as fn(_, _) -> _);
    black_box(s::FlowMatchEulerDiscreteScheduler::from_config as fn(_, _) -> _);
    black_box(xfuser_layers::attention_processor::SequenceParallelAttention::ulysses as fn(_) -> _);
    black_box(xfuser_layers::pipefusion_attention::PipeFusionAttention::new as fn(_) -> _);
    s::CLASS_NAMES
}
