//! The text side of the PixArt pipelines: the T5 tokenizer (from `tokenizer.json` or
//! `spiece.model`) and the T5 encoder with its attention mask, numerically as transformers 5.23.
//!
//! ```no_run
//! # fn main() -> xfuser_core::Result<()> {
//! use std::path::Path;
//! use xfuser_pipelines::text::{T5EncoderModel, T5Tokenizer};
//! let device = candle_core::Device::Cpu;
//! let tokenizer = T5Tokenizer::from_dir(Path::new("PixArt/tokenizer"))?;
//! let encoder = T5EncoderModel::from_dir(Path::new("PixArt/text_encoder"), candle_core::DType::F32, &device)?;
//! let batch = tokenizer.encode_batch(&["a small cat"], 120, &device)?;
//! let hidden = encoder.forward(&batch.input_ids, Some(&batch.attention_mask))?; // (1, 120, 4096)
//! # Ok(()) }
//! ```

mod spiece;
pub mod t5;
pub mod tokenizer;

pub use t5::{T5Config, T5EncoderModel};
pub use tokenizer::{T5Tokenizer, TokenizedBatch, TokenizerConfig};
