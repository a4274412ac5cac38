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
    let de = &mut serde_json::Deserializer::from_str(text);
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

    #[test]
    fn unknown_keys_are_ignored() {
        let cfg: Cfg =
            parse_json_config("{\"num_layers\": 2, \"extra\": [1]}", Path::new("c.json")).unwrap();
        assert_eq!(cfg.num_layers, 2);
    }
}
