//! `config.json` of a Hugging Face decoder-only transformer.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::{json_error, ModelError};

/// The model hyper-parameters read from `config.json`, validated.
///
/// Guarantees after a successful parse: `architectures` is non-empty; every size is positive;
/// `num_key_value_heads` divides `num_attention_heads`; when `head_dim` was absent it equals
/// `hidden_size / num_attention_heads` (and that division is exact). `raw` holds the whole file
/// for keys not modelled here; read them with the `optional_*` helpers to get the same error
/// messages.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The file this was read from (used in error messages).
    pub path: PathBuf,
    /// `architectures`, e.g. `["LlamaForCausalLM"]`; never empty.
    pub architectures: Vec<String>,
    /// `model_type`, e.g. `"llama"`.
    pub model_type: String,
    /// `num_hidden_layers`: number of decoder blocks.
    pub num_hidden_layers: usize,
    /// `hidden_size`: width of the residual stream.
    pub hidden_size: usize,
    /// `intermediate_size`: width of the MLP.
    pub intermediate_size: usize,
    /// `num_attention_heads`: query heads.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (default: `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// `head_dim` (default: `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta` (default 10000).
    pub rope_theta: f64,
    /// `tie_word_embeddings` (default false).
    pub tie_word_embeddings: bool,
    /// `dtype`, or the older `torch_dtype` if `dtype` is absent (e.g. `"bfloat16"`).
    pub dtype: Option<String>,
    /// `rope_scaling` (absent or `null`: [`RopeScaling::None`]).
    pub rope_scaling: RopeScaling,
    /// `attention_bias` (default false): the attention linears have biases (Llama, Qwen3).
    pub attention_bias: bool,
    /// `mlp_bias` (default false): the MLP linears have biases (Llama).
    pub mlp_bias: bool,
    /// The attention window in tokens, if the model uses one: `sliding_window`, unless
    /// `use_sliding_window` (Qwen) is present and false.
    pub sliding_window: Option<usize>,
    /// The whole parsed file.
    pub raw: Value,
}

impl ModelConfig {
    /// Reads and validates `path` (normally `<model dir>/config.json`).
    pub fn from_file(path: &Path) -> Result<ModelConfig, ModelError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelError::ConfigMissing {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => {
                return Err(ModelError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        };
        ModelConfig::from_json_str(&text, path)
    }

    /// Parses config text; `path` is only used to name the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig, ModelError> {
        let raw: Value = serde_json::from_str(text).map_err(|e| json_error(path, &e))?;
        if !raw.is_object() {
            return Err(ModelError::ConfigKeyType {
                path: path.to_path_buf(),
                key: "(top level)".to_string(),
                expected: "a JSON object",
                found: describe(&raw),
            });
        }
        let mut cfg = ModelConfig {
            path: path.to_path_buf(),
            architectures: Vec::new(),
            model_type: String::new(),
            num_hidden_layers: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_attention_heads: 0,
            num_key_value_heads: 0,
            head_dim: 0,
            vocab_size: 0,
            rms_norm_eps: 0.0,
            rope_theta: 0.0,
            tie_word_embeddings: false,
            dtype: None,
            rope_scaling: RopeScaling::None,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            raw,
        };

        cfg.architectures = cfg.required(
            "architectures",
            |v| {
                let arr = v.as_array()?;
                let names: Option<Vec<String>> =
                    arr.iter().map(|a| a.as_str().map(str::to_string)).collect();
                names.filter(|n| !n.is_empty() && n.iter().all(|s| !s.is_empty()))
            },
            "a non-empty array of strings",
        )?;
        cfg.model_type = cfg.required(
            "model_type",
            |v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string),
            "a non-empty string",
        )?;
        cfg.num_hidden_layers = cfg.required_usize("num_hidden_layers")?;
        cfg.hidden_size = cfg.required_usize("hidden_size")?;
        cfg.intermediate_size = cfg.required_usize("intermediate_size")?;
        cfg.num_attention_heads = cfg.required_usize("num_attention_heads")?;
        cfg.vocab_size = cfg.required_usize("vocab_size")?;
        cfg.rms_norm_eps = cfg.required("rms_norm_eps", positive_f64, POSITIVE_NUMBER)?;
        cfg.rope_theta = cfg.optional_f64("rope_theta")?.unwrap_or(10000.0);
        cfg.tie_word_embeddings = cfg.optional_bool("tie_word_embeddings")?.unwrap_or(false);
        // transformers >= 4.56 writes `dtype`; older versions `torch_dtype`.
        cfg.dtype = match cfg.optional_str("dtype")? {
            Some(d) => Some(d.to_string()),
            None => cfg.optional_str("torch_dtype")?.map(str::to_string),
        };

        cfg.rope_scaling = RopeScaling::from_config(&cfg)?;
        cfg.attention_bias = cfg.optional_bool("attention_bias")?.unwrap_or(false);
        cfg.mlp_bias = cfg.optional_bool("mlp_bias")?.unwrap_or(false);
        cfg.sliding_window = match cfg.optional_bool("use_sliding_window")? {
            Some(false) => None,
            _ => cfg.optional_usize("sliding_window")?,
        };

        cfg.num_key_value_heads = cfg
            .optional_usize("num_key_value_heads")?
            .unwrap_or(cfg.num_attention_heads);
        if cfg.num_attention_heads % cfg.num_key_value_heads != 0 {
            return Err(ModelError::ConfigInconsistent {
                path: path.to_path_buf(),
                message: format!(
                    "\"num_key_value_heads\" ({}) does not divide \"num_attention_heads\" ({})",
                    cfg.num_key_value_heads, cfg.num_attention_heads
                ),
            });
        }
        cfg.head_dim = match cfg.optional_usize("head_dim")? {
            Some(d) => d,
            None if cfg.hidden_size % cfg.num_attention_heads == 0 => {
                cfg.hidden_size / cfg.num_attention_heads
            }
            None => {
                return Err(ModelError::ConfigInconsistent {
                    path: path.to_path_buf(),
                    message: format!(
                        "\"head_dim\" is absent and \"num_attention_heads\" ({}) does not divide \"hidden_size\" ({})",
                        cfg.num_attention_heads, cfg.hidden_size
                    ),
                })
            }
        };
        Ok(cfg)
    }

    /// The first entry of `architectures`, e.g. `"LlamaForCausalLM"`.
    pub fn architecture(&self) -> &str {
        // Non-empty by construction; the fallback only guards hand-built values.
        self.architectures.first().map_or("", String::as_str)
    }

    /// The raw value of a top-level key; `None` if absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key)
    }

    /// An optional positive integer key (`null` counts as absent).
    pub fn optional_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.optional(key, positive_usize, POSITIVE_INTEGER)
    }

    /// An optional positive finite number key (`null` counts as absent).
    pub fn optional_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.optional(key, positive_f64, POSITIVE_NUMBER)
    }

    /// An optional boolean key (`null` counts as absent).
    pub fn optional_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.optional(key, Value::as_bool, "true or false")
    }

    /// An optional string key (`null` counts as absent).
    pub fn optional_str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_error(key, "a string", v)),
        }
    }

    fn required_usize(&self, key: &str) -> Result<usize, ModelError> {
        self.required(key, positive_usize, POSITIVE_INTEGER)
    }

    fn optional<T>(
        &self,
        key: &str,
        parse: impl Fn(&Value) -> Option<T>,
        expected: &'static str,
    ) -> Result<Option<T>, ModelError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => parse(v)
                .map(Some)
                .ok_or_else(|| self.type_error(key, expected, v)),
        }
    }

    fn required<T>(
        &self,
        key: &str,
        parse: impl Fn(&Value) -> Option<T>,
        expected: &'static str,
    ) -> Result<T, ModelError> {
        self.optional(key, parse, expected)?
            .ok_or_else(|| ModelError::ConfigKeyMissing {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }

    fn type_error(&self, key: &str, expected: &'static str, found: &Value) -> ModelError {
        ModelError::ConfigKeyType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: describe(found),
        }
    }
}

/// `rope_scaling` of config.json: how RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `rope_scaling` absent, `null`, or `{"rope_type": "default"}`.
    None,
    /// `{"rope_type": "linear", "factor": f}`: positions divided by `f` (every inverse
    /// frequency divided by `f`).
    Linear {
        /// `factor`.
        factor: f64,
    },
    /// `{"rope_type": "llama3", ...}`: Llama 3.1's wavelength-dependent rule (low frequencies
    /// divided by `factor`, high ones kept, a smooth blend between).
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor` (greater than `low_freq_factor`).
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
}

/// The `rope_type` values [`RopeScaling`] understands.
const ROPE_TYPES: &str =
    "one of \"default\", \"linear\", \"llama3\" (the supported rope_scaling types)";

impl RopeScaling {
    /// Reads `rope_scaling`; the type is `rope_type`, or the older `type` (as transformers
    /// reads it).
    fn from_config(cfg: &ModelConfig) -> Result<RopeScaling, ModelError> {
        let obj = match cfg.raw.get("rope_scaling") {
            None | Some(Value::Null) => return Ok(RopeScaling::None),
            Some(Value::Object(o)) => o,
            Some(v) => return Err(cfg.type_error("rope_scaling", "an object or null", v)),
        };
        let (type_key, kind) = match (obj.get("rope_type"), obj.get("type")) {
            (Some(v), _) => ("rope_scaling.rope_type", v),
            (None, Some(v)) => ("rope_scaling.type", v),
            (None, None) => {
                return Err(ModelError::ConfigKeyMissing {
                    path: cfg.path.clone(),
                    key: "rope_scaling.rope_type".to_string(),
                })
            }
        };
        let number = |key: &str| -> Result<f64, ModelError> {
            let full = format!("rope_scaling.{key}");
            match obj.get(key) {
                None | Some(Value::Null) => Err(ModelError::ConfigKeyMissing {
                    path: cfg.path.clone(),
                    key: full,
                }),
                Some(v) => positive_f64(v).ok_or_else(|| cfg.type_error(&full, POSITIVE_NUMBER, v)),
            }
        };
        match kind.as_str() {
            Some("default") => Ok(RopeScaling::None),
            Some("linear") => Ok(RopeScaling::Linear {
                factor: number("factor")?,
            }),
            Some("llama3") => {
                let key = "original_max_position_embeddings";
                let original = match obj.get(key) {
                    None | Some(Value::Null) => {
                        return Err(ModelError::ConfigKeyMissing {
                            path: cfg.path.clone(),
                            key: format!("rope_scaling.{key}"),
                        })
                    }
                    Some(v) => positive_usize(v).ok_or_else(|| {
                        cfg.type_error(&format!("rope_scaling.{key}"), POSITIVE_INTEGER, v)
                    })?,
                };
                let s = RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: original,
                };
                match s {
                    RopeScaling::Llama3 {
                        low_freq_factor: lo,
                        high_freq_factor: hi,
                        ..
                    } if hi <= lo => Err(ModelError::ConfigInconsistent {
                        path: cfg.path.clone(),
                        message: format!(
                            "\"rope_scaling.high_freq_factor\" ({hi}) must be greater than \"rope_scaling.low_freq_factor\" ({lo})"
                        ),
                    }),
                    s => Ok(s),
                }
            }
            _ => Err(cfg.type_error(type_key, ROPE_TYPES, kind)),
        }
    }
}

const POSITIVE_INTEGER: &str = "a positive integer";
const POSITIVE_NUMBER: &str = "a positive number";

fn positive_usize(v: &Value) -> Option<usize> {
    v.as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
}

fn positive_f64(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite() && *x > 0.0)
}

/// The value as compact JSON, shortened so a huge value cannot flood an error message.
fn describe(v: &Value) -> String {
    const MAX: usize = 60;
    let s = v.to_string();
    if s.chars().count() <= MAX {
        s
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORIES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/models/stories260K/config.json"
    );
    // shared/ sits beside the repository (CI and developers alike).
    const SMOL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/models/SmolLM2-135M-q41dq/config.json"
    );

    fn parse(text: &str) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_json_str(text, Path::new("/m/config.json"))
    }

    fn minimal() -> serde_json::Map<String, Value> {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 8,
            "vocab_size": 100,
            "rms_norm_eps": 1e-5
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn with(key: &str, value: Value) -> String {
        let mut m = minimal();
        m.insert(key.to_string(), value);
        Value::Object(m).to_string()
    }

    fn without(key: &str) -> String {
        let mut m = minimal();
        m.remove(key);
        Value::Object(m).to_string()
    }

    #[test]
    fn real_configs() {
        let c = ModelConfig::from_file(Path::new(STORIES)).unwrap();
        assert_eq!(c.architecture(), "LlamaForCausalLM");
        assert_eq!(c.model_type, "llama");
        assert_eq!(
            (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
            (5, 64, 172)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (8, 4, 8)
        );
        assert_eq!(c.vocab_size, 512);
        assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.dtype.as_deref(), Some("float32"));
        assert_eq!(c.get("bos_token_id"), Some(&Value::from(1)));

        let s = ModelConfig::from_file(Path::new(SMOL)).unwrap();
        assert_eq!(
            (s.num_hidden_layers, s.hidden_size, s.head_dim),
            (30, 576, 64)
        );
        assert_eq!((s.num_attention_heads, s.num_key_value_heads), (9, 3));
        assert_eq!(s.rope_theta, 100000.0);
        assert!(s.tie_word_embeddings);
        assert_eq!(s.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(s.optional_usize("pad_token_id").unwrap(), Some(2));
    }

    #[test]
    fn defaults() {
        let c = parse(&Value::Object(minimal()).to_string()).unwrap();
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.dtype, None);
        // null counts as absent (Mistral-style configs write "head_dim": null).
        let c = parse(&with("head_dim", Value::Null)).unwrap();
        assert_eq!(c.head_dim, 8);
        let c = parse(&with("torch_dtype", "float16".into())).unwrap();
        assert_eq!(c.dtype.as_deref(), Some("float16"));
    }

    #[test]
    fn missing_file() {
        let err = ModelConfig::from_file(Path::new("/nonexistent/dir/config.json")).unwrap_err();
        assert!(matches!(err, ModelError::ConfigMissing { .. }));
        assert!(
            err.to_string().contains("/nonexistent/dir/config.json"),
            "{err}"
        );
    }

    #[test]
    fn invalid_json_reports_position() {
        let err = parse("{\n  \"hidden_size\": 64,\n  oops\n}").unwrap_err();
        match &err {
            ModelError::Json { line, column, .. } => assert_eq!((*line, *column), (3, 3)),
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("/m/config.json") && msg.contains("line 3, column 3"),
            "{msg}"
        );
    }

    #[test]
    fn missing_required_key() {
        for key in [
            "architectures",
            "model_type",
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "vocab_size",
            "rms_norm_eps",
        ] {
            let err = parse(&without(key)).unwrap_err();
            assert!(
                matches!(err, ModelError::ConfigKeyMissing { .. }),
                "{key}: {err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("\"{key}\"")) && msg.contains("/m/config.json"),
                "{msg}"
            );
        }
    }

    #[test]
    fn wrong_types() {
        let err = parse(&with("num_hidden_layers", "x".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"num_hidden_layers\" in /m/config.json: expected a positive integer, found \"x\""
        );
        let err = parse(&with("hidden_size", 0.into())).unwrap_err();
        assert!(err.to_string().contains("found 0"), "{err}");
        let err = parse(&with("hidden_size", (-3).into())).unwrap_err();
        assert!(err.to_string().contains("found -3"), "{err}");
        let err = parse(&with("vocab_size", 64.5.into())).unwrap_err();
        assert!(err.to_string().contains("\"vocab_size\""), "{err}");
        let err = parse(&with("architectures", serde_json::json!([]))).unwrap_err();
        assert!(err.to_string().contains("non-empty array"), "{err}");
        let err = parse(&with("architectures", "LlamaForCausalLM".into())).unwrap_err();
        assert!(err.to_string().contains("\"architectures\""), "{err}");
        let err = parse(&with("tie_word_embeddings", "yes".into())).unwrap_err();
        assert!(err.to_string().contains("true or false"), "{err}");
        let err = parse(&with("rms_norm_eps", (-1.0).into())).unwrap_err();
        assert!(err.to_string().contains("positive number"), "{err}");
        let err = parse(&with("dtype", 16.into())).unwrap_err();
        assert!(err.to_string().contains("\"dtype\"") && err.to_string().contains("a string"));
        // Huge values are shortened.
        let err = parse(&with("hidden_size", "y".repeat(500).into())).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
        let err = parse("[1, 2]").unwrap_err();
        assert!(err.to_string().contains("a JSON object"), "{err}");
    }

    #[test]
    fn rope_scaling() {
        use serde_json::json;
        let c = ModelConfig::from_file(Path::new(STORIES)).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::None); // "rope_scaling": null
        assert_eq!(
            parse(&without("rope_scaling")).unwrap().rope_scaling,
            RopeScaling::None
        );
        let c = parse(&with("rope_scaling", json!({"rope_type": "default"}))).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::None);
        // The older "type" key, as transformers still reads it.
        let c = parse(&with(
            "rope_scaling",
            json!({"type": "linear", "factor": 4.0}),
        ))
        .unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        let c = parse(&with(
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        ))
        .unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );

        let err = |v: Value| parse(&with("rope_scaling", v)).unwrap_err().to_string();
        let e = err(json!({"rope_type": "yarn", "factor": 4.0}));
        assert!(
            e.contains("\"rope_scaling.rope_type\"")
                && e.contains("\"yarn\"")
                && e.contains("\"linear\"")
                && e.contains("\"llama3\"")
                && e.contains("/m/config.json"),
            "{e}"
        );
        let e = err(json!({"type": "dynamic", "factor": 2.0}));
        assert!(
            e.contains("\"rope_scaling.type\"") && e.contains("\"dynamic\""),
            "{e}"
        );
        let e = err(json!({"factor": 2.0}));
        assert!(e.contains("\"rope_scaling.rope_type\" is missing"), "{e}");
        let e = err(json!({"rope_type": "linear"}));
        assert!(e.contains("\"rope_scaling.factor\" is missing"), "{e}");
        let e = err(json!({"rope_type": "linear", "factor": "4"}));
        assert!(
            e.contains("\"rope_scaling.factor\"") && e.contains("positive number"),
            "{e}"
        );
        let e = err(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0}),
        );
        assert!(
            e.contains("rope_scaling.original_max_position_embeddings"),
            "{e}"
        );
        let e = err(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        );
        assert!(e.contains("must be greater than"), "{e}");
        let e = err(json!(2.0));
        assert!(
            e.contains("\"rope_scaling\"") && e.contains("an object or null"),
            "{e}"
        );
    }

    #[test]
    fn biases_and_sliding_window() {
        let c = ModelConfig::from_file(Path::new(STORIES)).unwrap();
        assert!(!c.attention_bias && !c.mlp_bias);
        assert_eq!(c.sliding_window, None);
        let c = parse(&with("attention_bias", true.into())).unwrap();
        assert!(c.attention_bias && !c.mlp_bias);
        let c = parse(&with("mlp_bias", true.into())).unwrap();
        assert!(c.mlp_bias);
        // Mistral: "sliding_window": 4096 (or null).
        assert_eq!(
            parse(&with("sliding_window", 4096.into()))
                .unwrap()
                .sliding_window,
            Some(4096)
        );
        assert_eq!(
            parse(&with("sliding_window", Value::Null))
                .unwrap()
                .sliding_window,
            None
        );
        // Qwen: the window only applies with "use_sliding_window": true.
        let mut m = minimal();
        m.insert("sliding_window".into(), 32768.into());
        m.insert("use_sliding_window".into(), false.into());
        assert_eq!(
            parse(&Value::Object(m.clone()).to_string())
                .unwrap()
                .sliding_window,
            None
        );
        m.insert("use_sliding_window".into(), true.into());
        assert_eq!(
            parse(&Value::Object(m).to_string()).unwrap().sliding_window,
            Some(32768)
        );
        let e = parse(&with("attention_bias", 1.into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"attention_bias\"") && e.contains("true or false"),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_heads() {
        let err = parse(&with("num_attention_heads", 6.into())).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ModelError::ConfigInconsistent { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("\"hidden_size\" (64)") && msg.contains("(6)"),
            "{msg}"
        );
        // An explicit head_dim makes the division unnecessary.
        let mut m = minimal();
        m.insert("num_attention_heads".into(), 6.into());
        m.insert("head_dim".into(), 16.into());
        let c = parse(&Value::Object(m).to_string()).unwrap();
        assert_eq!(c.head_dim, 16);

        let err = parse(&with("num_key_value_heads", 3.into())).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"num_key_value_heads\" (3) does not divide"),
            "{msg}"
        );
    }
}
