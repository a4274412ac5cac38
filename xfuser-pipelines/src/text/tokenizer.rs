//! The T5 tokenizer of the PixArt pipelines, as transformers 5.23's `T5Tokenizer` (a
//! tokenizers-backed Unigram) builds it, and called as diffusers calls it:
//! `tokenizer(prompts, padding="max_length", max_length=n, truncation=True,
//! add_special_tokens=True)`.
//!
//! Both files give the same tokenizer, the one `T5Tokenizer.__init__` builds around a vocabulary
//! (whatever else a `tokenizer.json` says, transformers 5 keeps only its vocabulary, its
//! precompiled charsmap and its added tokens):
//! - model: Unigram, `<unk>` at id 2, no byte fallback. From `spiece.model` (what the PixArt
//!   repositories ship; `TokenizersBackend._convert_from_sentencepiece` + `T5Converter`): the
//!   pieces and their scores, then `extra_ids` sentinels `<extra_id_{n-1}>` … `<extra_id_0>`
//!   with score 0;
//! - normalizer: the precompiled charsmap (sentencepiece's nmt_nfkc), if there is one;
//! - pre-tokenizer: `WhitespaceSplit`, then `Metaspace("▁", prepend_scheme="always",
//!   split=true)`. transformers 5 ignores `legacy` here: every word gets its `▁`;
//! - post-processor: `$A </s>`;
//! - special added tokens: unk, eos, pad, the `extra_ids` sentinels (added with new ids if the
//!   vocabulary lacks them, as transformers does) and, from `spiece.model`, the control pieces;
//!   user-defined pieces as plain added tokens.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{NormalizerWrapper, Precompiled};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::utils::truncation::{truncate_encodings, TruncationParams};
use tokenizers::{AddedToken, ModelWrapper, PostProcessor, Tokenizer};
use xfuser_core::{Error, Result};

use super::spiece::{SentencePieceModel, MODEL_UNIGRAM, PIECE_CONTROL, PIECE_USER_DEFINED};

/// `tokenizer_config.json`: the keys that change how a T5 tokenizer is built. Every key is
/// optional, with `T5Tokenizer`'s defaults.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TokenizerConfig {
    #[serde(default = "default_eos")]
    pub eos_token: TokenString,
    #[serde(default = "default_unk")]
    pub unk_token: TokenString,
    #[serde(default = "default_pad")]
    pub pad_token: TokenString,
    #[serde(default = "default_extra_ids")]
    pub extra_ids: usize,
}

/// A token written either as a string or as a serialized `AddedToken` (`{"content": ...}`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum TokenString {
    Plain(String),
    Added { content: String },
}

impl TokenString {
    pub fn as_str(&self) -> &str {
        match self {
            TokenString::Plain(s) | TokenString::Added { content: s } => s,
        }
    }
}

fn default_eos() -> TokenString {
    TokenString::Plain("</s>".into())
}
fn default_unk() -> TokenString {
    TokenString::Plain("<unk>".into())
}
fn default_pad() -> TokenString {
    TokenString::Plain("<pad>".into())
}
fn default_extra_ids() -> usize {
    100
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            eos_token: default_eos(),
            unk_token: default_unk(),
            pad_token: default_pad(),
            extra_ids: default_extra_ids(),
        }
    }
}

impl TokenizerConfig {
    /// `dir/tokenizer_config.json`, or the defaults when the folder has none.
    pub fn read_or_default(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if path.is_file() {
            xfuser_core::config::read_json_config(&path)
        } else {
            Ok(Self::default())
        }
    }
}

/// What `T5Tokenizer.__init__` builds around a vocabulary: Unigram with `<unk>` at id 2 (fixed
/// there, whatever the sentencepiece trainer spec says) and no byte fallback, the precompiled
/// charsmap as the only normalizer, `WhitespaceSplit` + `Metaspace("▁", always, split)`,
/// `$A </s>` and the special tokens (unk, eos, pad, `extra_ids` sentinels). `source` is named in
/// errors.
fn build_t5(
    tokenizer: &mut Tokenizer,
    vocab: Vec<(String, f64)>,
    charsmap: Option<Precompiled>,
    config: &TokenizerConfig,
    source: &Path,
) -> Result<()> {
    const UNK_ID: usize = 2;
    let bad = |message: String| Error::Config {
        file: source.to_path_buf(),
        field: "vocab".into(),
        message,
    };
    if vocab.len() <= UNK_ID {
        return Err(bad(format!(
            "{} pieces: a T5 vocabulary starts with <pad>, </s>, <unk>",
            vocab.len()
        )));
    }
    let model = Unigram::from(vocab, Some(UNK_ID), false)
        .map_err(|e| bad(format!("cannot build a unigram model: {e}")))?;
    tokenizer.with_model(model);
    tokenizer
        .with_normalizer(charsmap)
        .map_err(|e| Error::invalid(e.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new(
        '▁',
        PrependScheme::Always,
        true,
    )));

    let sentinels = (0..config.extra_ids).map(|i| format!("<extra_id_{i}>"));
    let special: Vec<AddedToken> = [&config.unk_token, &config.eos_token, &config.pad_token]
        .into_iter()
        .map(|t| t.as_str().to_string())
        .chain(sentinels)
        .map(|t| AddedToken::from(t, true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| bad(e.to_string()))?;

    let eos = config.eos_token.as_str();
    let eos_id = tokenizer
        .token_to_id(eos)
        .ok_or_else(|| bad(format!("the eos token {eos} is not in the vocabulary")))?;
    let template = TemplateProcessing::builder()
        .try_single(format!("$A {eos}"))
        .and_then(|b| b.try_pair(format!("$A {eos} $B {eos}")))
        .map_err(|e| Error::invalid(e.to_string()))?
        .special_tokens(vec![(eos.to_string(), eos_id)])
        .build()
        .map_err(|e| Error::invalid(e.to_string()))?;
    tokenizer.with_post_processor(Some(template));
    Ok(())
}

/// The precompiled charsmap of a tokenizer.json normalizer, alone or inside a sequence.
fn find_precompiled(normalizer: &NormalizerWrapper) -> Option<&Precompiled> {
    match normalizer {
        NormalizerWrapper::Precompiled(p) => Some(p),
        NormalizerWrapper::Sequence(seq) => seq.as_ref().iter().find_map(find_precompiled),
        _ => None,
    }
}

/// Token ids and attention mask of a batch of prompts, both `(B, max_length)` `u32`, padded on
/// the right (mask 1 on tokens, including the final `</s>`, 0 on padding).
#[derive(Debug, Clone)]
pub struct TokenizedBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

#[derive(Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    /// The file the tokenizer was built from, for error messages.
    source: PathBuf,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl T5Tokenizer {
    /// A diffusers `tokenizer/` folder: `tokenizer.json` when present, else `spiece.model`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        if dir.join("spiece.model").is_file() {
            return Self::from_spiece(dir);
        }
        Err(Error::Config {
            file: dir.to_path_buf(),
            field: "tokenizer".into(),
            message: "no tokenizer found: expected tokenizer.json or spiece.model".into(),
        })
    }

    /// A `tokenizer.json`, read as transformers 5.23's `T5Tokenizer` reads one: only its
    /// Unigram vocabulary, its precompiled charsmap and its added tokens are kept; the rest of
    /// the pipeline is T5's (see the module documentation), whatever the file says. Truncation
    /// and padding stored in the file are dropped: `encode_batch` applies diffusers'.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let bad = |field: &str, message: String| Error::Config {
            file: path.to_path_buf(),
            field: field.into(),
            message,
        };
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| bad("tokenizer", format!("not a readable tokenizer.json: {e}")))?;
        let vocab: Vec<(String, f64)> = match tokenizer.get_model() {
            ModelWrapper::Unigram(unigram) => unigram.iter().cloned().collect(),
            _ => {
                return Err(bad(
                    "model.type",
                    "a T5 tokenizer needs a Unigram model".into(),
                ))
            }
        };
        let charsmap = tokenizer
            .get_normalizer()
            .and_then(find_precompiled)
            .cloned();
        let config = TokenizerConfig::read_or_default(path.parent().unwrap_or(Path::new(".")))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::invalid(e.to_string()))?;
        tokenizer.with_padding(None);
        build_t5(&mut tokenizer, vocab, charsmap, &config, path)?;
        Self::finish(tokenizer, &config, path)
    }

    /// `dir/spiece.model` (+ `dir/tokenizer_config.json` if present), converted as transformers
    /// 5.23 does (see the module documentation).
    pub fn from_spiece(dir: &Path) -> Result<Self> {
        let path = dir.join("spiece.model");
        let config = TokenizerConfig::read_or_default(dir)?;
        let spm = SentencePieceModel::read(&path)?;
        let bad = |field: &str, message: String| Error::Config {
            file: path.clone(),
            field: field.into(),
            message,
        };
        if spm.model_type != MODEL_UNIGRAM {
            return Err(bad(
                "trainer_spec.model_type",
                format!(
                    "a T5 tokenizer needs a unigram model, found model type {}",
                    spm.model_type
                ),
            ));
        }
        let sentinels = (0..config.extra_ids)
            .rev()
            .map(|i| (format!("<extra_id_{i}>"), 0.0));
        let vocab: Vec<(String, f64)> = spm
            .pieces
            .iter()
            .map(|p| (p.piece.clone(), f64::from(p.score)))
            .chain(sentinels)
            .collect();
        let charsmap = if spm.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(Precompiled::from(&spm.precompiled_charsmap).map_err(|e| {
                bad(
                    "normalizer_spec.precompiled_charsmap",
                    format!("unreadable: {e}"),
                )
            })?)
        };

        // Placeholder model, replaced by `build_t5`.
        let mut tokenizer = Tokenizer::new(Unigram::default());
        build_t5(&mut tokenizer, vocab, charsmap, &config, &path)?;
        // transformers' SentencePieceExtractor: control pieces are special added tokens,
        // user-defined pieces plain (unnormalized) added tokens.
        let control: Vec<AddedToken> = spm
            .pieces
            .iter()
            .filter(|p| p.kind == PIECE_CONTROL)
            .map(|p| AddedToken::from(p.piece.clone(), true))
            .collect();
        let user_defined: Vec<AddedToken> = spm
            .pieces
            .iter()
            .filter(|p| p.kind == PIECE_USER_DEFINED)
            .map(|p| AddedToken::from(p.piece.clone(), false).normalized(false))
            .collect();
        tokenizer
            .add_special_tokens(control)
            .and_then(|_| tokenizer.add_tokens(user_defined))
            .map_err(|e| bad("pieces", e.to_string()))?;
        Self::finish(tokenizer, &config, &path)
    }

    fn finish(tokenizer: Tokenizer, config: &TokenizerConfig, source: &Path) -> Result<Self> {
        let pad = config.pad_token.as_str();
        let pad_id = tokenizer.token_to_id(pad).ok_or_else(|| Error::Config {
            file: source.to_path_buf(),
            field: "pad_token".into(),
            message: format!("the pad token {pad} is not in the vocabulary"),
        })?;
        Ok(Self {
            tokenizer,
            pad_id,
            source: source.to_path_buf(),
        })
    }

    /// Vocabulary size including the added tokens (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying tokenizers-crate tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids of one prompt with `</s>` appended, truncated to `max_length` (`</s>` kept last),
    /// not padded: `tokenizer(prompt, truncation=True, max_length=n)["input_ids"]`.
    pub fn encode(&self, prompt: &str, max_length: usize) -> Result<Vec<u32>> {
        if max_length == 0 {
            return Err(Error::invalid(
                "T5Tokenizer::encode: max_length must be at least 1",
            ));
        }
        encode_truncated(&self.tokenizer, &self.source, prompt, max_length)
    }

    /// diffusers' `tokenizer(prompts, padding="max_length", max_length=max_length,
    /// truncation=True, add_special_tokens=True)`: `(B, max_length)` ids and mask, on `device`.
    pub fn encode_batch(
        &self,
        prompts: &[&str],
        max_length: usize,
        device: &Device,
    ) -> Result<TokenizedBatch> {
        let mut ids = Vec::with_capacity(prompts.len() * max_length);
        let mut mask = Vec::with_capacity(prompts.len() * max_length);
        for prompt in prompts {
            let tokens = self.encode(prompt, max_length)?;
            let n = tokens.len().min(max_length);
            ids.extend_from_slice(&tokens[..n]);
            ids.extend(std::iter::repeat_n(self.pad_id, max_length - n));
            mask.extend(std::iter::repeat_n(1u32, n));
            mask.extend(std::iter::repeat_n(0u32, max_length - n));
        }
        let shape = (prompts.len(), max_length);
        Ok(TokenizedBatch {
            input_ids: Tensor::from_vec(ids, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?,
        })
    }
}

/// The ids of `prompt` with the post-processor's special tokens, truncated to `max_length` as
/// `tokenizer(prompt, truncation=True, max_length=n)` does: room is kept for the tokens the
/// post-processor adds, so that a truncated prompt still ends with its end token. `source`
/// names the tokenizer in errors.
pub(crate) fn encode_truncated(
    tokenizer: &Tokenizer,
    source: &Path,
    prompt: &str,
    max_length: usize,
) -> Result<Vec<u32>> {
    let err = |e: tokenizers::Error| {
        Error::invalid(format!(
            "tokenizer {}: cannot encode {prompt:?}: {e}",
            source.display()
        ))
    };
    let words = tokenizer.encode(prompt, false).map_err(err)?;
    let added = tokenizer
        .get_post_processor()
        .map_or(0, |p| p.added_tokens(false));
    let params = TruncationParams {
        max_length: max_length.saturating_sub(added),
        ..TruncationParams::default()
    };
    let (words, _) = truncate_encodings(words, None, &params).map_err(err)?;
    let encoding = tokenizer.post_process(words, None, true).map_err(err)?;
    Ok(encoding.get_ids().to_vec())
}
