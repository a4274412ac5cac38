//! The CLIP tokenizers of the Stable Diffusion 3 pipelines (`tokenizer/`, `tokenizer_2/`), as
//! transformers 5.23's `CLIPTokenizer` builds one from `vocab.json` + `merges.txt` (what the SD3
//! repositories ship: no `tokenizer.json`), and called as diffusers calls it:
//! `tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`.
//!
//! The pipeline `CLIPTokenizer.__init__` puts around the vocabulary:
//! - model: byte-level BPE, no continuing-subword prefix, `</w>` end-of-word suffix, unknown
//!   token `unk_token`, no unk fusing, no dropout;
//! - normalizer: NFC, every whitespace run to one space, lower case;
//! - pre-tokenizer: CLIP's split regex (the matches are the words, the rest is dropped), then
//!   byte-level (GPT-2's regex too, no prefix space);
//! - post-processor: `<|startoftext|> $A <|endoftext|>` (`RobertaProcessing(eos, bos)`);
//! - added tokens: the `added_tokens_decoder` of `tokenizer_config.json`, then bos, eos, unk and
//!   pad as special tokens. A special added token is matched in the raw text before
//!   normalization and the BPE: with SD3's CLIP-G tokenizer, whose pad token is `"!"`, every `!`
//!   of a prompt becomes the bare `!` token rather than `!</w>`, as in transformers.
//!
//! The special tokens come from `tokenizer_config.json`; when it has no `added_tokens_decoder`,
//! `special_tokens_map.json` overrides them (transformers' legacy loading). Unlike transformers,
//! which would append a missing pad token to the vocabulary with a new id (one the text encoder
//! has no embedding for), a bos, eos, unk or pad token that is not in the vocabulary is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};
use xfuser_core::{Error, Result};

use crate::text::tokenizer::encode_truncated;

/// The words of CLIP's pre-tokenizer (transformers' `CLIPTokenizer`): the special tokens,
/// English contractions, letter runs, single digits and runs of other non-space characters.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const END_OF_WORD: &str = "</w>";

/// A token in `tokenizer_config.json` / `special_tokens_map.json`: a string or a serialized
/// `AddedToken`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Full(AddedTokenSpec),
}

/// A serialized `AddedToken`, each flag with transformers' default.
#[derive(Debug, Clone, serde::Deserialize)]
struct AddedTokenSpec {
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    normalized: Option<bool>,
    #[serde(default)]
    special: bool,
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) => s,
            TokenSpec::Full(t) => &t.content,
        }
    }

    /// The token as a special added token: transformers' `AddedToken(..., special=True)`,
    /// not normalized unless the file says so.
    fn special_token(&self) -> AddedToken {
        match self {
            TokenSpec::Plain(s) => AddedToken::from(s.clone(), true),
            TokenSpec::Full(t) => AddedToken::from(t.content.clone(), true)
                .single_word(t.single_word)
                .lstrip(t.lstrip)
                .rstrip(t.rstrip)
                .normalized(t.normalized.unwrap_or(false)),
        }
    }
}

impl AddedTokenSpec {
    fn added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized.unwrap_or(!self.special))
    }
}

/// The keys of `tokenizer_config.json` a CLIP tokenizer reads; all optional.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct ClipTokenizerConfig {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    /// A float in some files (`1e30` for "no limit").
    model_max_length: Option<f64>,
    added_tokens_decoder: Option<BTreeMap<String, AddedTokenSpec>>,
}

/// `special_tokens_map.json`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct SpecialTokensMap {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
}

/// One of the named special tokens and the file it was read from (or `vocab.json` for
/// `CLIPTokenizer`'s default), for error messages.
#[derive(Debug, Clone)]
struct NamedToken {
    field: &'static str,
    spec: TokenSpec,
    file: PathBuf,
}

/// A CLIP BPE tokenizer folder, numerically as transformers 5.23's `CLIPTokenizer`.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    model_max_length: Option<usize>,
    /// The folder the tokenizer was read from, for error messages.
    source: PathBuf,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// `vocab.json`: token → id.
fn read_vocab(path: &Path) -> Result<Vocab> {
    let map: BTreeMap<String, u32> =
        serde_json::from_str(&read_text(path)?).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            field: "vocab".into(),
            message: format!("expected a JSON object of token to id: {e}"),
        })?;
    Ok(map.into_iter().collect())
}

/// `merges.txt`: one `left right` pair a line, by rank, after an optional `#version` line.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = read_text(path)?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::Config {
                    file: path.to_path_buf(),
                    field: format!("line {}", n + 1),
                    message: format!("expected two tokens separated by one space, found {line:?}"),
                })
            }
        }
    }
    Ok(merges)
}

impl ClipTokenizer {
    /// A diffusers `tokenizer/` or `tokenizer_2/` folder of a CLIP tokenizer: `vocab.json` and
    /// `merges.txt`, with `tokenizer_config.json` and `special_tokens_map.json` when present.
    /// Errors name the file (and the field or token).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        for path in [&vocab_path, &merges_path] {
            if !path.is_file() {
                return Err(Error::Config {
                    file: path.clone(),
                    field: "file".into(),
                    message: "missing: a CLIP tokenizer folder needs vocab.json and merges.txt"
                        .into(),
                });
            }
        }
        let vocab = read_vocab(&vocab_path)?;
        let merges = read_merges(&merges_path)?;

        let config_path = dir.join("tokenizer_config.json");
        let config: ClipTokenizerConfig = if config_path.is_file() {
            xfuser_core::config::read_json_config(&config_path)?
        } else {
            ClipTokenizerConfig::default()
        };
        let map_path = dir.join("special_tokens_map.json");
        // transformers reads special_tokens_map.json only when the config has no
        // added_tokens_decoder, and then lets it override the config.
        let map: SpecialTokensMap = if config.added_tokens_decoder.is_none() && map_path.is_file() {
            xfuser_core::config::read_json_config(&map_path)?
        } else {
            SpecialTokensMap::default()
        };
        let named = |field: &'static str,
                     from_map: &Option<TokenSpec>,
                     from_config: &Option<TokenSpec>,
                     default: &str| {
            let (spec, file) = match (from_map, from_config) {
                (Some(spec), _) => (spec.clone(), map_path.clone()),
                (None, Some(spec)) => (spec.clone(), config_path.clone()),
                (None, None) => (TokenSpec::Plain(default.into()), vocab_path.clone()),
            };
            NamedToken { field, spec, file }
        };
        let bos = named(
            "bos_token",
            &map.bos_token,
            &config.bos_token,
            "<|startoftext|>",
        );
        let eos = named(
            "eos_token",
            &map.eos_token,
            &config.eos_token,
            "<|endoftext|>",
        );
        let unk = named(
            "unk_token",
            &map.unk_token,
            &config.unk_token,
            "<|endoftext|>",
        );
        let pad = named(
            "pad_token",
            &map.pad_token,
            &config.pad_token,
            "<|endoftext|>",
        );

        let bpe_error = |e: tokenizers::Error| Error::Config {
            file: merges_path.clone(),
            field: "merges".into(),
            message: format!("cannot build the BPE model: {e}"),
        };
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk.spec.content().to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD.into())
            .fuse_unk(false)
            .build()
            .map_err(bpe_error)?;
        let mut tokenizer = Tokenizer::new(bpe);
        let invalid = |e: tokenizers::Error| Error::invalid(e.to_string());
        let whitespace =
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(invalid)?;
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(invalid)?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(invalid)?;
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        // transformers: the added_tokens_decoder first (at the ids it names), then the named
        // special tokens.
        if let Some(decoder) = &config.added_tokens_decoder {
            for (id, spec) in decoder {
                let bad = |message: String| Error::Config {
                    file: config_path.clone(),
                    field: format!("added_tokens_decoder.{id}"),
                    message,
                };
                let want: u32 = id
                    .parse()
                    .map_err(|_| bad(format!("{id:?} is not a token id")))?;
                let token = spec.added_token();
                if spec.special {
                    tokenizer
                        .add_special_tokens([token])
                        .map_err(|e| bad(e.to_string()))?;
                } else {
                    tokenizer
                        .add_tokens([token])
                        .map_err(|e| bad(e.to_string()))?;
                }
                let got = tokenizer.token_to_id(&spec.content);
                if got != Some(want) {
                    return Err(bad(format!(
                        "{:?} has id {got:?} in {}, not {want}",
                        spec.content,
                        vocab_path.display()
                    )));
                }
            }
        }
        let mut ids = Vec::with_capacity(4);
        for token in [&bos, &eos, &unk, &pad] {
            let content = token.spec.content();
            let id = tokenizer
                .token_to_id(content)
                .ok_or_else(|| Error::Config {
                    file: token.file.clone(),
                    field: token.field.into(),
                    message: format!(
                        "the token {content:?} is not in the vocabulary ({})",
                        vocab_path.display()
                    ),
                })?;
            ids.push(id);
        }
        let (bos_id, eos_id, pad_id) = (ids[0], ids[1], ids[3]);
        // Tokens the added_tokens_decoder already added keep the flags it gave them.
        let declared: Vec<&str> = config
            .added_tokens_decoder
            .iter()
            .flat_map(|d| d.values().map(|t| t.content.as_str()))
            .collect();
        let special: Vec<AddedToken> = [&bos, &eos, &unk, &pad]
            .into_iter()
            .filter(|t| !declared.contains(&t.spec.content()))
            .map(|t| t.spec.special_token())
            .collect();
        tokenizer.add_special_tokens(special).map_err(invalid)?;
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new(
                (eos.spec.content().to_string(), eos_id),
                (bos.spec.content().to_string(), bos_id),
            )
            .trim_offsets(false)
            .add_prefix_space(false),
        ));

        // Files without a limit say 1e30 (transformers' VERY_LARGE_INTEGER): no limit.
        let model_max_length = config
            .model_max_length
            .filter(|n| (1.0..1e15).contains(n))
            .map(|n| n as usize);
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            model_max_length,
            source: dir.to_path_buf(),
        })
    }

    /// Vocabulary size including the added tokens (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `model_max_length` of `tokenizer_config.json` (77 for SD3's CLIP tokenizers), `None`
    /// when the file sets no limit.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// The underlying tokenizers-crate tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids of one prompt between bos and eos, truncated to `max_length` with the eos kept
    /// last, not padded: `tokenizer(prompt, truncation=True, max_length=n)["input_ids"]`.
    pub fn encode(&self, prompt: &str, max_length: usize) -> Result<Vec<u32>> {
        if max_length < 2 {
            return Err(Error::invalid(format!(
                "ClipTokenizer::encode: max_length must be at least 2 (bos and eos), got {max_length}"
            )));
        }
        encode_truncated(&self.tokenizer, &self.source, prompt, max_length)
    }

    /// diffusers' `tokenizer(texts, padding="max_length", max_length=max_length,
    /// truncation=True)`: `(B, max_length)` `u32` ids on `device`, padded on the right with the
    /// tokenizer's pad token.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        max_length: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(texts.len() * max_length);
        for text in texts {
            let tokens = self.encode(text, max_length)?;
            ids.extend_from_slice(&tokens);
            ids.extend(std::iter::repeat_n(self.pad_id, max_length - tokens.len()));
        }
        Ok(Tensor::from_vec(ids, (texts.len(), max_length), device)?)
    }
}
