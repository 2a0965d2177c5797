//! Parsing and validation of a safetensors file header.
//!
//! Done by hand rather than with `safetensors::SafeTensors::read_metadata` because we need the
//! `__metadata__` entries in file order (to write them back unchanged) and errors that name the
//! offending tensor; the checks are the same as that crate's: 8-byte little-endian header
//! length, UTF-8 JSON object, known dtypes, `data_offsets` contiguous from 0 with no gap or
//! overlap, covering the data section exactly, and matching dtype × shape.

use std::path::Path;

use serde_json::Value;

use super::dtype::DType;
use super::error::ModelError;

/// Largest header accepted, as in the `safetensors` crate.
pub(crate) const MAX_HEADER_LEN: usize = 100_000_000;

/// One tensor entry of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub data_offsets: (usize, usize),
}

/// A validated header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    /// Length of the JSON text (the value of the 8-byte prefix); data starts at `8 + json_len`.
    pub json_len: usize,
    /// `__metadata__` entries in file order.
    pub metadata: Vec<(String, String)>,
    /// Tensors in data-offset order.
    pub tensors: Vec<HeaderTensor>,
}

impl Header {
    /// Offset in the file of the first data byte.
    pub fn data_start(&self) -> usize {
        8 + self.json_len
    }
}

/// Parses and validates the header of the safetensors file whose full contents are `buf`
/// (`path` names it in errors).
pub(crate) fn parse_header(buf: &[u8], path: &Path) -> Result<Header, ModelError> {
    let bad = |message: String| ModelError::ShardHeader {
        path: path.to_path_buf(),
        message,
    };
    let Some(prefix) = buf.get(..8) else {
        return Err(bad(format!(
            "file is {} bytes, shorter than the 8-byte header length (truncated?)",
            buf.len()
        )));
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(prefix);
    let declared = u64::from_le_bytes(len_bytes);
    let json_len = usize::try_from(declared)
        .ok()
        .filter(|&n| n <= MAX_HEADER_LEN)
        .ok_or_else(|| {
            bad(format!(
                "header length {declared} exceeds the {MAX_HEADER_LEN}-byte limit (not a safetensors file?)"
            ))
        })?;
    let Some(json) = buf.get(8..8 + json_len) else {
        return Err(bad(format!(
            "header declares {json_len} bytes of JSON but the file has only {} bytes after the length (truncated?)",
            buf.len() - 8
        )));
    };
    let text =
        std::str::from_utf8(json).map_err(|e| bad(format!("header is not valid UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "header is not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })?;
    let Value::Object(entries) = value else {
        return Err(bad("header is not a JSON object".to_string()));
    };

    let data_len = buf.len() - 8 - json_len;
    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        if name == "__metadata__" {
            let Value::Object(m) = entry else {
                return Err(bad("\"__metadata__\" is not a JSON object".to_string()));
            };
            for (k, v) in m {
                match v {
                    Value::String(s) => metadata.push((k, s)),
                    other => {
                        return Err(bad(format!(
                            "\"__metadata__\" value for \"{k}\" must be a string, found {other}"
                        )))
                    }
                }
            }
            continue;
        }
        tensors.push(parse_entry(name, &entry, path, data_len)?);
    }

    // Zero-sized tensors share their start with the next one; order them first.
    tensors.sort_by_key(|t| t.data_offsets);
    let mut expected_start = 0usize;
    for t in &tensors {
        let (start, end) = t.data_offsets;
        if start != expected_start {
            let what = if start < expected_start {
                "overlaps the previous tensor"
            } else {
                "leaves a gap after the previous tensor"
            };
            return Err(bad(format!(
                "tensor \"{}\" data_offsets [{start}, {end}] {what} (expected it to start at {expected_start})",
                t.name
            )));
        }
        expected_start = end;
    }
    if expected_start != data_len {
        return Err(bad(format!(
            "tensors cover {expected_start} bytes of data but the file has {data_len} bytes after the header"
        )));
    }
    Ok(Header {
        json_len,
        metadata,
        tensors,
    })
}

fn parse_entry(
    name: String,
    entry: &Value,
    path: &Path,
    data_len: usize,
) -> Result<HeaderTensor, ModelError> {
    let bad = |message: String| ModelError::ShardHeader {
        path: path.to_path_buf(),
        message,
    };
    let dtype_name = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("tensor \"{name}\" has no string \"dtype\"")))?;
    let dtype = DType::from_name(dtype_name).ok_or_else(|| {
        bad(format!(
            "tensor \"{name}\" has unknown dtype \"{dtype_name}\""
        ))
    })?;
    let shape: Vec<usize> = entry
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        })
        .ok_or_else(|| {
            bad(format!(
                "tensor \"{name}\" has no \"shape\" array of non-negative integers"
            ))
        })?;
    let offsets = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .and_then(|a| {
            let s = usize::try_from(a[0].as_u64()?).ok()?;
            let e = usize::try_from(a[1].as_u64()?).ok()?;
            Some((s, e))
        })
        .ok_or_else(|| {
            bad(format!(
                "tensor \"{name}\" has no \"data_offsets\" pair of non-negative integers"
            ))
        })?;
    let (start, end) = offsets;
    if start > end || end > data_len {
        return Err(bad(format!(
            "tensor \"{name}\" data_offsets [{start}, {end}] are out of range (data section is {data_len} bytes)"
        )));
    }
    let expected = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|numel| dtype.byte_len(numel));
    if expected != Some(end - start) {
        return Err(ModelError::TensorSize {
            path: path.to_path_buf(),
            tensor: name,
            dtype,
            shape,
            expected,
            actual: end - start,
        });
    }
    Ok(HeaderTensor {
        name,
        dtype,
        shape,
        data_offsets: offsets,
    })
}

/// Serializes a header (JSON padded with spaces to a multiple of 8 bytes, as the `safetensors`
/// crate writes it), including the 8-byte length prefix. Tensors are written in the given order.
pub(crate) fn encode_header(metadata: &[(String, String)], tensors: &[HeaderTensor]) -> Vec<u8> {
    let mut root = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        root.insert("__metadata__".to_string(), Value::Object(m));
    }
    for t in tensors {
        root.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype.name(),
                "shape": t.shape,
                "data_offsets": [t.data_offsets.0, t.data_offsets.1],
            }),
        );
    }
    let mut json = Value::Object(root).to_string().into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(json: &str, data_len: usize) -> Vec<u8> {
        let mut buf = (json.len() as u64).to_le_bytes().to_vec();
        buf.extend_from_slice(json.as_bytes());
        buf.resize(buf.len() + data_len, 0);
        buf
    }

    fn err_of(buf: &[u8]) -> String {
        parse_header(buf, Path::new("/x/shard.safetensors"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_valid_header_in_offset_order() {
        let json = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt","k":"v"},"a":{"dtype":"BF16","shape":[3,1],"data_offsets":[8,14]},"z":{"dtype":"I8","shape":[0],"data_offsets":[14,14]}}"#;
        let h = parse_header(&file_with_header(json, 14), Path::new("s")).unwrap();
        assert_eq!(h.json_len, json.len());
        assert_eq!(
            h.metadata,
            vec![("format".into(), "pt".into()), ("k".into(), "v".into())]
        );
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "z"]);
        assert_eq!(h.tensors[1].dtype, DType::BF16);
        assert_eq!(h.tensors[1].shape, vec![3, 1]);
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let tensors = vec![
            HeaderTensor {
                name: "w".into(),
                dtype: DType::F16,
                shape: vec![2, 2],
                data_offsets: (0, 8),
            },
            HeaderTensor {
                name: "n".into(),
                dtype: DType::U8,
                shape: vec![3],
                data_offsets: (8, 11),
            },
        ];
        let meta = vec![("format".to_string(), "pt".to_string())];
        let mut buf = encode_header(&meta, &tensors);
        assert_eq!((buf.len() - 8) % 8, 0);
        buf.resize(buf.len() + 11, 7);
        let h = parse_header(&buf, Path::new("s")).unwrap();
        assert_eq!(h.tensors, tensors);
        assert_eq!(h.metadata, meta);
        // The safetensors crate agrees with our encoding.
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        assert_eq!(st.tensor("n").unwrap().data(), &[7, 7, 7]);
    }

    #[test]
    fn truncated_and_garbage_files() {
        assert!(err_of(&[1, 2, 3]).contains("shorter than the 8-byte header"));
        assert!(err_of(&u64::MAX.to_le_bytes()).contains("exceeds"));
        let mut short = 100u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"{}");
        let msg = err_of(&short);
        assert!(
            msg.contains("/x/shard.safetensors") && msg.contains("truncated"),
            "{msg}"
        );
        assert!(err_of(&file_with_header("{\"a\":", 0)).contains("not valid JSON"));
        assert!(err_of(&file_with_header("[1,2]", 0)).contains("not a JSON object"));
        let mut bad_utf8 = 2u64.to_le_bytes().to_vec();
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        assert!(err_of(&bad_utf8).contains("UTF-8"));
    }

    #[test]
    fn bad_entries() {
        let cases = [
            (
                r#"{"t":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
                1,
                "unknown dtype \"Q4\"",
            ),
            (
                r#"{"t":{"shape":[1],"data_offsets":[0,1]}}"#,
                1,
                "no string \"dtype\"",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                1,
                "\"shape\"",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#,
                1,
                "\"data_offsets\"",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
                2,
                "out of range",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[2,0]}}"#,
                2,
                "out of range",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
                5,
                "cover 2 bytes",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"u":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                3,
                "\"u\" data_offsets [1, 3] overlaps",
            ),
            (
                r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"u":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#,
                5,
                "leaves a gap",
            ),
            (r#"{"__metadata__":{"n":1}}"#, 0, "must be a string"),
        ];
        for (json, data_len, expected) in cases {
            let msg = err_of(&file_with_header(json, data_len));
            assert!(msg.contains(expected), "{json}: {msg}");
            assert!(msg.contains("/x/shard.safetensors"), "{msg}");
        }
    }

    #[test]
    fn dtype_shape_length_mismatch_names_tensor() {
        let json = r#"{"layer.w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}}"#;
        let err =
            parse_header(&file_with_header(json, 10), Path::new("/x/s.safetensors")).unwrap_err();
        assert!(matches!(
            err,
            ModelError::TensorSize {
                expected: Some(12),
                actual: 10,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("\"layer.w\"")
                && msg.contains("BF16")
                && msg.contains("[2, 3]")
                && msg.contains("12 bytes"),
            "{msg}"
        );
    }
}
