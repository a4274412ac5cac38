//! The text side of the pipelines, numerically as transformers 5.23: the T5 tokenizer (from
//! `tokenizer.json` or `spiece.model`) and the T5 encoder with its attention mask (PixArt, SD3's
//! `text_encoder_3`), and the CLIP BPE tokenizer and `CLIPTextModelWithProjection` (SD3's
//! `tokenizer`/`text_encoder` and `tokenizer_2`/`text_encoder_2`).
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

pub mod clip;
pub mod clip_tokenizer;
mod spiece;
pub mod t5;
pub mod tokenizer;

pub use clip::{ClipTextConfig, ClipTextModelWithProjection, ClipTextOutput};
pub use clip_tokenizer::ClipTokenizer;
pub use t5::{T5Config, T5EncoderModel};
pub use tokenizer::{T5Tokenizer, TokenizedBatch, TokenizerConfig};
