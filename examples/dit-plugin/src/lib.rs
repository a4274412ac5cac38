//! DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") as a model added from
//! outside the xfuser tree: diffusers' `DiTTransformer2DModel` ([`dit_transformer_2d`]) and
//! `DiTPipeline` ([`pipeline_dit`]), registered in the xfuser registry, and the `xfuser-dit`
//! binary (`src/main.rs`), which is the stock command line with these two registered too.
//!
//! The crate uses only the public API of the xfuser crates and contains no parallel code: data,
//! CFG, Ulysses, Ring, USP and PipeFusion parallelism come from the runtime, and tensor
//! parallelism from xfuser-layers' column- and row-parallel linears, which the model loads in
//! place of its whole ones. It is the worked example of docs/adding-models.md.

pub mod dit_transformer_2d;
pub mod pipeline_dit;

pub use dit_transformer_2d::{xFuserDiTTransformer2DWrapper, DiTTransformer2DModel};
pub use pipeline_dit::{xFuserDiTPipeline, DiTPipeline};

/// Keeps this crate's registrations in a binary that links it.
///
/// `inventory::submit!` places each registration in a static of the module that submits it,
/// collected before `main` runs. The linker only pulls the object files of a library that
/// resolve a symbol the binary uses; a binary that never names anything of this crate can
/// lose its registrations silently (the models are then missing from `xfuser list` and
/// "unknown pipeline class" is all a user sees). Calling this from `main` references each
/// registering module's loader, so those modules' objects, and their registrations, are
/// linked. Returns the registered class names (pipeline, transformer).
pub fn link() -> [&'static str; 2] {
    // black_box: the references must survive optimisation.
    std::hint::black_box(pipeline_dit::load_pipeline as fn(_, _) -> _);
    std::hint::black_box(dit_transformer_2d::load_backbone as fn(_, _) -> _);
    // The stock schedulers and attention processors DiT's folders name.
    xfuser_pipelines::link_stock_registrations();
    [pipeline_dit::CLASS_NAME, dit_transformer_2d::CLASS_NAME]
}
