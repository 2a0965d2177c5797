//! Parsing an algorithm's manifest parameter table.

use serde::de::DeserializeOwned;

use crate::abi::PluginError;

/// Parses the TOML text of a `[[pipeline]]` stage's `params` table into `T`.
///
/// Derive `serde::Deserialize` with `#[serde(deny_unknown_fields)]` on `T` so that a typo is an
/// error naming the key; the message names the algorithm and keeps toml's line/column.
pub fn parse_params<T: DeserializeOwned>(algorithm: &str, text: &str) -> Result<T, PluginError> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().to_string();
        PluginError::invalid_params(format!("parameters of `{algorithm}`: {msg}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct P {
        #[serde(default)]
        damp: f64,
    }

    #[test]
    fn parses_and_rejects_unknown_keys() {
        assert_eq!(
            parse_params::<P>("x", "damp = 0.5").unwrap(),
            P { damp: 0.5 }
        );
        assert_eq!(parse_params::<P>("x", "").unwrap(), P { damp: 0.0 });
        let e = parse_params::<P>("gptq", "dmap = 0.5").unwrap_err();
        assert_eq!(e.kind, crate::abi::ErrorKind::INVALID_PARAMS);
        assert!(
            e.message.contains("gptq") && e.message.contains("dmap"),
            "{e}"
        );
    }
}
