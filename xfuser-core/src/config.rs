//! Reading the JSON configuration files of a diffusers folder (`config.json`,
//! `scheduler_config.json`, `model_index.json`) into typed structs, with errors that name the
//! file and the offending field.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads `path` as JSON into `T`. Unknown keys are ignored (as diffusers does); a missing or
/// mistyped field gives an [`Error::Config`] naming the file, the field and what was expected.
pub fn read_json_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json_config(&text, path)
}

/// Parses `text` (the contents of `path`) as JSON into `T`; see [`read_json_config`].
pub fn parse_json_config<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let text = quote_non_finite(text);
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let inner = err.inner();
        let message = inner.to_string();
        let mut field = err.path().to_string();
        // serde reports a missing field at its parent's path; name the field itself.
        if let Some(missing) = missing_field_name(&message) {
            field = if field == "." {
                missing.to_string()
            } else {
                format!("{field}.{missing}")
            };
        }
        Error::Config {
            file: path.to_path_buf(),
            field,
            message,
        }
    })
}

/// Reads an already parsed JSON `value` (from `path`) into `T`; see [`read_json_config`].
pub fn json_value_config<T: DeserializeOwned>(value: &serde_json::Value, path: &Path) -> Result<T> {
    parse_json_config(&value.to_string(), path)
}

/// Reads `path` as an untyped JSON value (for dispatch on `_class_name` before the typed read).
pub fn read_json_value(path: &Path) -> Result<serde_json::Value> {
    read_json_config(path)
}

/// The `_class_name` of a diffusers config, as an error naming the file when absent.
pub fn class_name_of(value: &serde_json::Value, path: &Path) -> Result<String> {
    match value.get("_class_name") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Error::Config {
            file: path.to_path_buf(),
            field: "_class_name".into(),
            message: format!("expected a string, found {other}"),
        }),
        None => Err(Error::Config {
            file: path.to_path_buf(),
            field: "_class_name".into(),
            message: "missing field `_class_name`".into(),
        }),
    }
}

/// The model class a transformers `config.json` names: the first entry of `architectures`
/// ("ViTForImageClassification"), as an error naming the file when absent.
pub fn architecture_of(value: &serde_json::Value, path: &Path) -> Result<String> {
    let error = |message: String| Error::Config {
        file: path.to_path_buf(),
        field: "architectures".into(),
        message,
    };
    match value.get("architectures") {
        Some(serde_json::Value::Array(names)) => match names.first() {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(error(format!("expected a class name, found {other}"))),
            None => Err(error("is empty; expected the model class name".into())),
        },
        Some(other) => Err(error(format!(
            "expected a list of class names, found {other}"
        ))),
        None => Err(error("missing field `architectures`".into())),
    }
}

/// Python's json module (and so diffusers' `save_pretrained`) writes non-finite floats as bare
/// `Infinity`, `-Infinity` and `NaN`, which JSON does not allow; e.g. DPM-Solver's default
/// `lambda_min_clipped` is `-Infinity`. Outside string literals, such tokens become the strings
/// `"Infinity"`, `"-Infinity"`, `"NaN"`, which fields read with [`f64_or_non_finite`] accept.
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    if !TOKENS.iter().any(|t| text.contains(t)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
                continue;
            }
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// Deserializes an f64 that may be written as `Infinity`, `-Infinity` or `NaN` (see
/// [`quote_non_finite`]); use as `#[serde(deserialize_with = "...")]`.
pub fn f64_or_non_finite<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> std::result::Result<f64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        Number(f64),
        Text(String),
    }
    match <Lenient as serde::Deserialize>::deserialize(de)? {
        Lenient::Number(x) => Ok(x),
        Lenient::Text(t) => match t.as_str() {
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            other => Err(serde::de::Error::custom(format!(
                "expected a number, Infinity, -Infinity or NaN, found string {other:?}"
            ))),
        },
    }
}

fn missing_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Cfg {
        num_layers: usize,
        #[serde(default)]
        norm_eps: f64,
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse_json_config::<Cfg>("{\"norm_eps\": 1e-6}", Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x/config.json"), "{err}");
        assert!(err.contains("field `num_layers`"), "{err}");
        assert!(err.contains("missing field"), "{err}");
    }

    #[test]
    fn mistyped_field_is_named_with_expectation() {
        let err = parse_json_config::<Cfg>("{\"num_layers\": \"two\"}", Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `num_layers`"), "{err}");
        assert!(err.contains("expected usize"), "{err}");
    }

    #[derive(Debug, serde::Deserialize)]
    struct Clip {
        #[serde(deserialize_with = "f64_or_non_finite")]
        lambda_min_clipped: f64,
        name: String,
    }

    #[test]
    fn python_non_finite_floats_are_read() {
        let text = r#"{"lambda_min_clipped": -Infinity, "name": "say \"NaN\" -Infinity"}"#;
        let cfg: Clip = parse_json_config(text, Path::new("s.json")).unwrap();
        assert_eq!(cfg.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(cfg.name, "say \"NaN\" -Infinity");
        let nan: Clip = parse_json_config(
            r#"{"lambda_min_clipped": NaN, "name": ""}"#,
            Path::new("s.json"),
        )
        .unwrap();
        assert!(nan.lambda_min_clipped.is_nan());
        let err = parse_json_config::<Clip>(
            r#"{"lambda_min_clipped": "low", "name": ""}"#,
            Path::new("s.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("lambda_min_clipped"), "{err}");
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let cfg: Cfg =
            parse_json_config("{\"num_layers\": 2, \"extra\": [1]}", Path::new("c.json")).unwrap();
        assert_eq!(cfg.num_layers, 2);
    }
}
