//! Text sources: a plain UTF-8 file, or the string field of each record of a `.jsonl` file.

use std::path::{Path, PathBuf};

use super::DataError;

/// How to turn a file into one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextKind {
    /// The whole file, read as UTF-8 as is (no newline translation, BOM kept, no normalisation).
    Plain,
    /// One JSON object per line; the string field `text_field` of each record, records joined
    /// with `"\n\n"`. Blank (whitespace-only) lines are skipped.
    Jsonl {
        /// The field holding each record's text (usually `"text"`).
        text_field: String,
    },
}

impl TextKind {
    /// `Jsonl` for a file named `*.jsonl` (any case), `Plain` otherwise.
    pub fn for_path(path: &Path, text_field: &str) -> Self {
        if has_extension(path, "jsonl") {
            TextKind::Jsonl {
                text_field: text_field.to_owned(),
            }
        } else {
            TextKind::Plain
        }
    }
}

/// Whether `path` ends in `.ext` (ASCII case-insensitive).
pub(crate) fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// Reads the text of `path` as `kind` says. Fails on an unreadable file, invalid UTF-8, a bad
/// `.jsonl` record, or a text that is empty or only whitespace.
pub fn read_text(path: &Path, kind: &TextKind) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let content = String::from_utf8(bytes).map_err(|e| DataError::Utf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    let text = match kind {
        TextKind::Plain => content,
        TextKind::Jsonl { text_field } => join_jsonl(path, &content, text_field)?,
    };
    if text.trim().is_empty() {
        let what = match (kind, text.is_empty()) {
            (TextKind::Plain, true) => "the file is empty",
            (TextKind::Plain, false) => "the file holds only whitespace",
            (TextKind::Jsonl { .. }, true) => "no text: no records, or only empty strings",
            (TextKind::Jsonl { .. }, false) => "the records hold only whitespace",
        };
        return Err(DataError::EmptyText {
            path: path.to_path_buf(),
            what: what.to_owned(),
        });
    }
    Ok(text)
}

/// The `text_field` strings of the records of `content`, joined with `"\n\n"`.
fn join_jsonl(path: &Path, content: &str, text_field: &str) -> Result<String, DataError> {
    let bad = |line: usize, message: String| DataError::JsonlLine {
        path: PathBuf::from(path),
        line,
        message,
    };
    let mut texts: Vec<String> = Vec::new();
    // Split on '\n' only (a trailing '\r' is JSON whitespace), so line numbers match editors.
    for (index, line) in content.split('\n').enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            bad(
                line_no,
                format!("not valid JSON (column {}): {e}", e.column()),
            )
        })?;
        let serde_json::Value::Object(mut fields) = record else {
            return Err(bad(
                line_no,
                format!("expected a JSON object, found {}", json_type(&record)),
            ));
        };
        match fields.remove(text_field) {
            Some(serde_json::Value::String(s)) => texts.push(s),
            Some(other) => {
                return Err(bad(
                    line_no,
                    format!(
                        "field \"{text_field}\" is {}, expected a string",
                        json_type(&other)
                    ),
                ))
            }
            None => {
                let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
                keys.sort_unstable();
                return Err(bad(
                    line_no,
                    format!(
                        "record has no field \"{text_field}\" (its fields: {})",
                        if keys.is_empty() {
                            "none".to_owned()
                        } else {
                            keys.join(", ")
                        }
                    ),
                ));
            }
        }
    }
    Ok(texts.join("\n\n"))
}

/// "a number", "an array", ... for messages.
pub(crate) fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn jsonl(field: &str) -> TextKind {
        TextKind::Jsonl {
            text_field: field.to_owned(),
        }
    }

    #[test]
    fn plain_text_is_read_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let raw = "\u{feff}caf\u{e9}\r\n  spaced \n\n\u{301}end";
        let path = write(&dir, "t.txt", raw.as_bytes());
        assert_eq!(read_text(&path, &TextKind::Plain).unwrap(), raw);
    }

    #[test]
    fn jsonl_records_are_joined_with_a_blank_line_and_blank_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "d.jsonl",
            b"{\"text\": \"first\\nline\", \"id\": 1}\n\n  \r\n{\"text\": \"second\"}\r\n{\"text\": \"\"}\n",
        );
        assert_eq!(
            read_text(&path, &jsonl("text")).unwrap(),
            "first\nline\n\nsecond\n\n"
        );
    }

    #[test]
    fn kind_follows_the_extension() {
        assert_eq!(TextKind::for_path(Path::new("a/b.JSONL"), "t"), jsonl("t"));
        assert_eq!(
            TextKind::for_path(Path::new("a/b.txt"), "t"),
            TextKind::Plain
        );
        assert_eq!(
            TextKind::for_path(Path::new("a/wiki.test.raw"), "t"),
            TextKind::Plain
        );
    }

    #[test]
    fn invalid_utf8_names_the_byte_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "bad.txt", b"abc\xe9def");
        let err = read_text(&path, &TextKind::Plain).unwrap_err();
        assert!(matches!(err, DataError::Utf8 { offset: 3, .. }), "{err:?}");
        assert!(err.to_string().contains("byte offset 3"), "{err}");
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.txt");
        let err = read_text(&path, &TextKind::Plain).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.txt"), "{err}");
    }

    #[test]
    fn bad_jsonl_lines_name_the_1_based_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], usize, &str); 4] = [
            (
                b"{\"text\": \"a\"}\n\n{\"text\": oops}\n",
                3,
                "not valid JSON",
            ),
            (
                b"{\"text\": \"a\"}\n[1, 2]\n",
                2,
                "expected a JSON object, found an array",
            ),
            (
                b"{\"body\": \"a\", \"id\": 2}\n",
                1,
                "no field \"text\" (its fields: body, id)",
            ),
            (
                b"\n{\"text\": 5}\n",
                2,
                "field \"text\" is a number, expected a string",
            ),
        ];
        for (bytes, line, needle) in cases {
            let path = write(&dir, "d.jsonl", bytes);
            let err = read_text(&path, &jsonl("text")).unwrap_err();
            assert!(
                matches!(&err, DataError::JsonlLine { line: l, .. } if *l == line),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&format!("d.jsonl, line {line}: ")), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn empty_texts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], TextKind, &str); 4] = [
            ("e.txt", b"", TextKind::Plain, "the file is empty"),
            ("w.txt", b" \n\t\n", TextKind::Plain, "only whitespace"),
            ("e.jsonl", b"\n\n", jsonl("text"), "no records"),
            (
                "w.jsonl",
                b"{\"text\": \" \"}\n",
                jsonl("text"),
                "only whitespace",
            ),
        ];
        for (name, bytes, kind, needle) in cases {
            let path = write(&dir, name, bytes);
            let err = read_text(&path, &kind).unwrap_err();
            assert!(matches!(err, DataError::EmptyText { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(name) && msg.contains(needle), "{msg}");
        }
    }
}
