//! `quantization_config` in config.json, written as llm-compressor writes it and read back.
//!
//! Writing follows compressed-tensors 0.20.0: `ModelCompressor.update_config` dumps
//! `QuantizationConfig.model_dump(exclude=["quant_method"])` plus `version`, `quant_method`,
//! `sparsity_config: {}` and `transform_config: {}`, and rewrites the whole config.json with
//! `json.dump(indent=2, sort_keys=True)` ([`python_json`]). `model_dump` keeps every field, so
//! each QuantizationArgs has all twelve keys (`actorder`, `block_structure`, `dynamic`,
//! `group_size`, `num_bits`, `observer`, `observer_kwargs`, `scale_dtype`, `strategy`,
//! `symmetric`, `type`, `zp_dtype`), and each scheme has `format`, `input_activations`,
//! `output_activations`, `targets`, `weights`.

use std::path::Path;

use gs_quant::{ActArgs, Granularity, QuantArgs, QuantType, ScaleRule};
use serde_json::{json, Map, Value};

use super::CtFormat;
use crate::export::ExportError;

/// The compressed-tensors release whose output this module writes.
pub(crate) const VERSION: &str = "0.20.0";

/// What one config group says about its layers (the `targets` aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GroupSpec {
    pub format: CtFormat,
    pub weights: QuantArgs,
    pub input: Option<ActArgs>,
}

impl GroupSpec {
    /// The group of a quantized layer's scheme. Scale rules are not part of the format: a
    /// stored scale is a stored scale, and a dynamic one follows `calculate_qparams`
    /// (`HalfRange`), so they are normalized here.
    pub(crate) fn of(weights: &QuantArgs, input: Option<&ActArgs>) -> GroupSpec {
        let weights = QuantArgs {
            scale_rule: ScaleRule::HalfRange,
            ..*weights
        };
        let input = input.map(|a| ActArgs {
            args: QuantArgs {
                scale_rule: ScaleRule::HalfRange,
                ..a.args
            },
            dynamic: a.dynamic,
        });
        GroupSpec {
            format: CtFormat::infer(&weights, input.as_ref()),
            weights,
            input,
        }
    }

    /// The scheme as compressed-tensors serializes it, with `targets`.
    pub(crate) fn to_json(self, targets: &[String]) -> Value {
        json!({
            "format": self.format.name(),
            "input_activations": self.input.map(|a| args_json(&a.args, Some(a.dynamic))),
            "output_activations": Value::Null,
            "targets": targets,
            "weights": args_json(&self.weights, None),
        })
    }
}

/// One `QuantizationArgs` as `model_dump()` gives it; `dynamic` is `None` for weights.
///
/// - `strategy`: weights `tensor`/`channel`/`group`; activations `tensor`, or `token` for a
///   dynamic per-row (per-token) quantizer. `group_size` is set only for `group`.
/// - `observer`: llm-compressor's names for what gs-host did: `memoryless_minmax` for weights
///   (the default `QuantizationArgs` sets for static args since compressed-tensors #540),
///   `static_minmax` for static activations (running min/max over all calibration data, the
///   `FP8` preset's observer), `null` for dynamic ones (the validator clears it).
/// - `zp_dtype`: `null` when symmetric (its field serializer), else `"torch.int8"` (the
///   `pytorch_dtype()` of int args up to 8 bits).
fn args_json(a: &QuantArgs, dynamic: Option<bool>) -> Value {
    let (strategy, group_size) = match (a.granularity, dynamic) {
        (Granularity::Tensor, _) => ("tensor", Value::Null),
        (Granularity::Channel, None) => ("channel", Value::Null),
        (Granularity::Channel, Some(_)) => ("token", Value::Null),
        (Granularity::Group(g), _) => ("group", Value::from(g)),
    };
    let observer = match dynamic {
        None => Value::from("memoryless_minmax"),
        Some(false) => Value::from("static_minmax"),
        Some(true) => Value::Null,
    };
    json!({
        "actorder": Value::Null,
        "block_structure": Value::Null,
        "dynamic": dynamic.unwrap_or(false),
        "group_size": group_size,
        "num_bits": a.bits,
        "observer": observer,
        "observer_kwargs": {},
        "scale_dtype": Value::Null,
        "strategy": strategy,
        "symmetric": a.symmetric,
        "type": match a.ty { QuantType::Int => "int", QuantType::Float => "float" },
        "zp_dtype": if a.symmetric { Value::Null } else { Value::from("torch.int8") },
    })
}

/// The whole `quantization_config` object: `groups` in order (`group_0`, …), `format` the
/// common format or `mixed-precision` (`_flatten_formats`).
pub(crate) fn quantization_config_json(
    groups: &[(GroupSpec, Vec<String>)],
    ignore: &[String],
) -> Value {
    let mut config_groups = Map::new();
    for (i, (spec, targets)) in groups.iter().enumerate() {
        config_groups.insert(format!("group_{i}"), spec.to_json(targets));
    }
    let mut formats: Vec<CtFormat> = groups.iter().map(|(s, _)| s.format).collect();
    formats.sort();
    formats.dedup();
    let format = match formats[..] {
        [f] => f.name(),
        _ => "mixed-precision",
    };
    json!({
        "config_groups": config_groups,
        "format": format,
        "global_compression_ratio": Value::Null,
        "ignore": ignore,
        "kv_cache_scheme": Value::Null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": VERSION,
    })
}

/// `json.dump(v, indent=2, sort_keys=True)` of CPython: keys sorted by code point, `", "`/`": "`
/// separators with a newline and two spaces per level, `ensure_ascii` escapes (`\uXXXX`,
/// lowercase hex, surrogate pairs), floats as `repr(float)`; no trailing newline.
pub(crate) fn python_json(v: &Value) -> String {
    let mut out = String::new();
    write_py(v, 0, &mut out);
    out
}

fn write_py(v: &Value, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', 2 * depth));
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => write_py_str(s, out),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                write_py(item, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                write_py_str(k, out);
                out.push_str(": ");
                write_py(&map[k], depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// A string as `json.dumps` with `ensure_ascii=True` writes it (`ESCAPE_ASCII`: everything
/// outside `' '..='~'` is escaped).
fn write_py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// `repr(x)` of a Python float: the shortest digits that round-trip, in fixed notation when
/// the decimal exponent `e` (as in `d.ddd × 10^e`) is in `-5 < e < 16`, else `d.ddde±XX`
/// (`float_repr_style = 'short'`, `PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0)`).
pub(crate) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` is Rust's shortest round-trip representation: "d[.ddd]e<exp>".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    let decpt = exp + 1; // digits[..decpt] are the integer part
    let n = digits.len() as i32;
    let body = if !(-4 < decpt && decpt <= 16) {
        let rest = &digits[1..];
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{}{frac}e{esign}{:02}", &digits[..1], exp.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt >= n {
        format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
    } else {
        format!(
            "{}.{}",
            &digits[..decpt as usize],
            &digits[decpt as usize..]
        )
    };
    format!("{sign}{body}")
}

/// A parsed config group.
#[derive(Debug, Clone)]
pub(crate) struct ParsedGroup {
    pub name: String,
    pub targets: Vec<String>,
    /// `None`: the group does not quantize weights (or is `dense`): its layers stay float.
    pub spec: Option<GroupSpec>,
}

/// The parts of `quantization_config` the decoder uses.
#[derive(Debug, Clone)]
pub(crate) struct ParsedConfig {
    pub groups: Vec<ParsedGroup>,
    pub ignore: Vec<String>,
}

/// Reads `quantization_config` of `file` (config.json); every error names the key at fault.
pub(crate) fn parse_quantization_config(
    qc: &Value,
    file: &Path,
) -> Result<ParsedConfig, ExportError> {
    let bad = |key: &str, reason: String| ExportError::BadCheckpoint {
        file: file.to_path_buf(),
        reason: format!("quantization_config.{key}: {reason}"),
    };
    let Some(qc) = qc.as_object() else {
        return Err(bad("", format!("expected an object, found {qc}")));
    };
    let absent = |k: &str| qc.get(k).is_none_or(Value::is_null);
    match qc.get("quant_method").and_then(Value::as_str) {
        Some("compressed-tensors") => {}
        other => {
            return Err(bad(
                "quant_method",
                format!("expected \"compressed-tensors\", found {other:?}"),
            ))
        }
    }
    match qc.get("quantization_status").and_then(Value::as_str) {
        Some("compressed") => {}
        other => {
            return Err(bad(
                "quantization_status",
                format!("is {}; only \"compressed\" checkpoints (packed/quantized tensors on disk) can be decoded", other.map_or("missing".to_string(), |s| format!("\"{s}\""))),
            ))
        }
    }
    let global = match qc.get("format").and_then(Value::as_str) {
        Some(f @ ("mixed-precision" | "dense")) => f.to_string(),
        Some(f) if CtFormat::from_name(f).is_some() => f.to_string(),
        other => {
            return Err(bad(
                "format",
                format!("{other:?} is not supported (supported: pack-quantized, int-quantized, float-quantized, naive-quantized, mixed-precision, dense)"),
            ))
        }
    };
    if !absent("kv_cache_scheme") {
        return Err(bad(
            "kv_cache_scheme",
            "KV-cache quantization is not supported by this decoder".into(),
        ));
    }
    for key in ["sparsity_config", "transform_config"] {
        if !(absent(key) || qc[key].as_object().is_some_and(Map::is_empty)) {
            return Err(bad(
                key,
                "sparsity and transforms are not supported by this decoder; expected {}".into(),
            ));
        }
    }
    let ignore = match qc.get("ignore") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("ignore", "expected a list of strings".into()))?,
        Some(v) => {
            return Err(bad(
                "ignore",
                format!("expected a list of strings, found {v}"),
            ))
        }
    };
    let Some(groups) = qc.get("config_groups").and_then(Value::as_object) else {
        return Err(bad("config_groups", "missing or not an object".into()));
    };
    let mut parsed = Vec::new();
    for (name, group) in groups {
        let key = format!("config_groups.{name}");
        let group = match group {
            // A preset name mapped to its targets (`QuantizationConfig.model_post_init`).
            Value::Array(_) => preset(name, group).ok_or_else(|| {
                bad(&key, format!("\"{name}\" is not a preset this decoder knows (W4A16, W4A16_ASYM, W8A16, W8A8, INT8, FP8, FP8_DYNAMIC)"))
            })?,
            Value::Object(_) => group.clone(),
            v => return Err(bad(&key, format!("expected a scheme object, found {v}"))),
        };
        let targets = group
            .get("targets")
            .and_then(Value::as_array)
            .and_then(|t| {
                t.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| {
                bad(
                    &format!("{key}.targets"),
                    "expected a list of strings".into(),
                )
            })?;
        if !group.get("output_activations").is_none_or(Value::is_null) {
            return Err(bad(
                &format!("{key}.output_activations"),
                "output activation quantization is not supported".into(),
            ));
        }
        let format = match group.get("format") {
            None | Some(Value::Null) => global.clone(),
            Some(Value::String(f)) => f.clone(),
            Some(v) => {
                return Err(bad(
                    &format!("{key}.format"),
                    format!("expected a string, found {v}"),
                ))
            }
        };
        let weights = match group.get("weights") {
            None | Some(Value::Null) => None,
            Some(w) => Some(parse_args(w, false).map_err(|e| bad(&format!("{key}.weights"), e))?),
        };
        let input = match group.get("input_activations") {
            None | Some(Value::Null) => None,
            Some(a) => {
                Some(parse_args(a, true).map_err(|e| bad(&format!("{key}.input_activations"), e))?)
            }
        };
        let spec = match (format.as_str(), weights) {
            ("dense", _) | (_, None) => None,
            (f, Some((weights, _))) => {
                let Some(format) = CtFormat::from_name(f) else {
                    return Err(bad(
                        &format!("{key}.format"),
                        format!("\"{f}\" does not name a layer format (a group under \"mixed-precision\" must set its own)"),
                    ));
                };
                let type_ok = match format {
                    CtFormat::Pack | CtFormat::Int => weights.ty == QuantType::Int,
                    CtFormat::Float => weights.ty == QuantType::Float,
                    CtFormat::Naive => true,
                };
                if !type_ok {
                    return Err(bad(
                        &format!("{key}.format"),
                        format!("\"{f}\" cannot hold {:?} weights", weights.ty),
                    ));
                }
                Some(GroupSpec {
                    format,
                    weights,
                    input: input.map(|(args, dynamic)| ActArgs { args, dynamic }),
                })
            }
        };
        parsed.push(ParsedGroup {
            name: name.clone(),
            targets,
            spec,
        });
    }
    Ok(ParsedConfig {
        groups: parsed,
        ignore,
    })
}

/// The scheme of a compressed-tensors preset (`quant_scheme.py` `PRESET_SCHEMES`) with `targets`.
fn preset(name: &str, targets: &Value) -> Option<Value> {
    let w = |bits: u8, strategy: &str, group: Option<u32>, symmetric: bool, ty: &str| json!({"num_bits": bits, "type": ty, "strategy": strategy, "group_size": group, "symmetric": symmetric, "dynamic": false});
    let token = |ty: &str| json!({"num_bits": 8, "type": ty, "strategy": "token", "symmetric": true, "dynamic": true});
    let (weights, input) = match name.to_uppercase().as_str() {
        "W4A16" => (w(4, "group", Some(128), true, "int"), Value::Null),
        "W4A16_ASYM" => (w(4, "group", Some(128), false, "int"), Value::Null),
        "W8A16" => (w(8, "group", Some(128), true, "int"), Value::Null),
        "W8A8" | "INT8" => (w(8, "channel", None, true, "int"), token("int")),
        "FP8" => (
            w(8, "tensor", None, true, "float"),
            json!({"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": true, "dynamic": false}),
        ),
        "FP8_DYNAMIC" => (w(8, "channel", None, true, "float"), token("float")),
        _ => return None,
    };
    Some(json!({"targets": targets, "weights": weights, "input_activations": input}))
}

/// One QuantizationArgs as this crate's args, `(args, dynamic)`; the error names the field.
/// Scale rules are `HalfRange` (compressed-tensors' `calculate_qparams`).
fn parse_args(v: &Value, activation: bool) -> Result<(QuantArgs, bool), String> {
    let Some(m) = v.as_object() else {
        return Err(format!("expected an object, found {v}"));
    };
    let get = |k: &str| m.get(k).filter(|v| !v.is_null());
    let bits = match get("num_bits") {
        None => 8,
        Some(b) => {
            b.as_u64()
                .filter(|b| (1..=8).contains(b))
                .ok_or_else(|| format!("num_bits {b} is not supported (1 to 8)"))? as u8
        }
    };
    let ty = match get("type").map(|t| t.as_str().map(str::to_lowercase)) {
        None => QuantType::Int,
        Some(Some(t)) if t == "int" => QuantType::Int,
        Some(Some(t)) if t == "float" => QuantType::Float,
        Some(t) => return Err(format!("type {t:?} is not supported (int or float)")),
    };
    let symmetric = match get("symmetric") {
        None => true,
        Some(s) => s
            .as_bool()
            .ok_or_else(|| format!("symmetric must be a boolean, found {s}"))?,
    };
    let dynamic = match get("dynamic") {
        None => false,
        Some(Value::Bool(d)) => *d,
        Some(d) => return Err(format!("dynamic {d} is not supported (true or false)")),
    };
    let group_size = match get("group_size") {
        None => None,
        Some(g) => Some(
            g.as_i64()
                .ok_or_else(|| format!("group_size must be an integer, found {g}"))?,
        ),
    };
    let strategy = match get("strategy") {
        Some(s) => s
            .as_str()
            .ok_or_else(|| format!("strategy must be a string, found {s}"))?
            .to_lowercase(),
        // QuantizationArgs.validate_model_after
        None => match group_size {
            None => "tensor".into(),
            Some(g) if g > 0 => "group".into(),
            Some(-1) => "channel".into(),
            Some(g) => return Err(format!("group_size {g} is invalid")),
        },
    };
    let granularity = match (strategy.as_str(), activation) {
        ("tensor", _) => Granularity::Tensor,
        ("channel", false) => Granularity::Channel,
        ("token", true) if dynamic => Granularity::Channel,
        ("token", true) => return Err("strategy token requires dynamic = true".into()),
        ("group", false) => match group_size {
            Some(g) if g > 0 && g <= i64::from(u32::MAX) => Granularity::Group(g as u32),
            _ => {
                return Err(format!(
                    "strategy group needs a positive group_size, found {group_size:?}"
                ))
            }
        },
        (s, _) => {
            return Err(format!(
                "strategy \"{s}\" is not supported for {}",
                if activation {
                    "input activations"
                } else {
                    "weights"
                }
            ))
        }
    };
    if get("block_structure").is_some() {
        return Err("block_structure is not supported".into());
    }
    match get("actorder") {
        None => {}
        Some(Value::String(s)) if matches!(s.to_lowercase().as_str(), "weight" | "static") => {}
        Some(a) => return Err(format!("actorder {a} (g_idx) is not supported")),
    }
    if !activation && dynamic {
        return Err("dynamic weights are not supported".into());
    }
    let args = QuantArgs {
        bits,
        ty,
        symmetric,
        granularity,
        scale_rule: ScaleRule::HalfRange,
    };
    args.validate().map_err(|e| e.to_string())?;
    Ok((args, dynamic))
}
