//! A minimal reader of sentencepiece's `spiece.model` (a serialized `ModelProto`, see
//! sentencepiece's `sentencepiece_model.proto`): only the fields a T5 tokenizer needs. Hand-written
//! rather than generated, so that no protobuf toolchain is needed for four fields.

use std::path::Path;

use xfuser_core::{Error, Result};

/// `SentencePiece.Type` values that matter here.
pub const PIECE_CONTROL: i32 = 3;
pub const PIECE_USER_DEFINED: i32 = 4;
/// `TrainerSpec.ModelType.UNIGRAM`.
pub const MODEL_UNIGRAM: i32 = 1;

#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    /// `SentencePiece.Type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub kind: i32,
}

#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type` (proto default: unigram).
    pub model_type: i32,
    /// `TrainerSpec.unk_id` (proto default 0).
    pub unk_id: i32,
    /// `NormalizerSpec.precompiled_charsmap`; empty when the model does no normalization.
    pub precompiled_charsmap: Vec<u8>,
}

impl SentencePieceModel {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes).map_err(|message| Error::Config {
            file: path.to_path_buf(),
            field: message.field.into(),
            message: format!("not a valid sentencepiece model: {}", message.text),
        })
    }

    fn parse(bytes: &[u8]) -> std::result::Result<Self, ParseError> {
        let mut model = Self {
            pieces: Vec::new(),
            model_type: MODEL_UNIGRAM,
            unk_id: 0,
            precompiled_charsmap: Vec::new(),
        };
        let mut reader = Reader::new(bytes, "ModelProto");
        while let Some((field, value)) = reader.next_field()? {
            match (field, value) {
                (1, Value::Bytes(b)) => model.pieces.push(parse_piece(b)?),
                (2, Value::Bytes(b)) => {
                    let mut spec = Reader::new(b, "trainer_spec");
                    while let Some((field, value)) = spec.next_field()? {
                        match (field, value) {
                            (3, Value::Varint(v)) => model.model_type = v as i32,
                            (40, Value::Varint(v)) => model.unk_id = v as i64 as i32,
                            _ => {}
                        }
                    }
                }
                (3, Value::Bytes(b)) => {
                    let mut spec = Reader::new(b, "normalizer_spec");
                    while let Some((field, value)) = spec.next_field()? {
                        if let (2, Value::Bytes(charsmap)) = (field, value) {
                            model.precompiled_charsmap = charsmap.to_vec();
                        }
                    }
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err(ParseError::new("pieces", "no pieces"));
        }
        Ok(model)
    }
}

fn parse_piece(bytes: &[u8]) -> std::result::Result<Piece, ParseError> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: 1,
    };
    let mut reader = Reader::new(bytes, "pieces");
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => {
                piece.piece = String::from_utf8(b.to_vec())
                    .map_err(|_| ParseError::new("pieces", "a piece is not UTF-8"))?
            }
            (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Value::Varint(v)) => piece.kind = v as i32,
            _ => {}
        }
    }
    Ok(piece)
}

#[derive(Debug)]
struct ParseError {
    field: &'static str,
    text: String,
}

impl ParseError {
    fn new(field: &'static str, text: impl Into<String>) -> Self {
        Self {
            field,
            text: text.into(),
        }
    }
}

enum Value<'a> {
    Varint(u64),
    /// No field read here is 64-bit: such fields are only skipped.
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Protobuf wire-format reader over one message.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], message: &'static str) -> Self {
        Self {
            bytes,
            pos: 0,
            message,
        }
    }

    fn truncated(&self) -> ParseError {
        ParseError::new(
            self.message,
            format!("truncated at byte {} of {}", self.pos, self.bytes.len()),
        )
    }

    fn varint(&mut self) -> std::result::Result<u64, ParseError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.pos).ok_or_else(|| self.truncated())?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ParseError::new(self.message, "varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], ParseError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.truncated())?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn next_field(&mut self) -> std::result::Result<Option<(u64, Value<'a>)>, ParseError> {
        if self.pos == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| self.truncated())?;
                Value::Bytes(self.take(len)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            wire => {
                return Err(ParseError::new(
                    self.message,
                    format!("unsupported wire type {wire} at byte {}", self.pos),
                ))
            }
        };
        Ok(Some((key >> 3, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut out = Vec::new();
        bytes_field(1, text.as_bytes(), &mut out);
        varint(2 << 3 | 5, &mut out);
        out.extend_from_slice(&score.to_le_bytes());
        varint(3 << 3, &mut out);
        varint(kind, &mut out);
        out
    }

    #[test]
    fn reads_pieces_unk_id_and_skips_unknown_fields() {
        let mut model = Vec::new();
        bytes_field(1, &piece("<pad>", 0.0, 3), &mut model);
        bytes_field(1, &piece("▁a", -1.5, 1), &mut model);
        let mut trainer = Vec::new();
        varint(40 << 3, &mut trainer);
        varint(1, &mut trainer);
        // An unknown 64-bit field and a negative int32 (pad_id = -1).
        varint(99 << 3 | 1, &mut trainer);
        trainer.extend_from_slice(&[0; 8]);
        varint(43 << 3, &mut trainer);
        varint(u64::MAX, &mut trainer);
        bytes_field(2, &trainer, &mut model);
        let parsed = SentencePieceModel::parse(&model).unwrap();
        assert_eq!(parsed.unk_id, 1);
        assert_eq!(parsed.model_type, MODEL_UNIGRAM);
        assert_eq!(parsed.pieces.len(), 2);
        assert_eq!(parsed.pieces[1].piece, "▁a");
        assert_eq!(parsed.pieces[1].score, -1.5);
        assert_eq!(parsed.pieces[0].kind, PIECE_CONTROL);
        assert!(parsed.precompiled_charsmap.is_empty());

        let err = SentencePieceModel::parse(&model[..model.len() - 3]).unwrap_err();
        assert!(err.text.contains("truncated"), "{}", err.text);
    }
}
