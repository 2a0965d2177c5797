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
    text_of(path, read_utf8(path)?, kind)
}

/// The whole file as UTF-8.
pub(crate) fn read_utf8(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| DataError::Utf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// The text of a file's `content` (already read from `path`) as `kind` says.
pub(crate) fn text_of(path: &Path, content: String, kind: &TextKind) -> Result<String, DataError> {
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

/// The key of a pre-tokenized record or window file.
pub(crate) const IDS_KEY: &str = "input_ids";

/// The non-blank lines of a `.jsonl` text with their 1-based numbers. Lines are split on `\n`
/// only (a trailing `\r` is JSON whitespace), so the numbers match editors.
pub(crate) fn jsonl_lines(content: &str) -> impl Iterator<Item = (usize, &str)> {
    content
        .split('\n')
        .enumerate()
        .map(|(index, line)| (index + 1, line))
        .filter(|(_, line)| !line.trim().is_empty())
}

/// The record on line `line_no` of a `.jsonl` file: a JSON object, or an error naming the line.
pub(crate) fn jsonl_record(
    path: &Path,
    line_no: usize,
    line: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, DataError> {
    let record: serde_json::Value = serde_json::from_str(line).map_err(|e| {
        jsonl_error(
            path,
            line_no,
            format!("not valid JSON (column {}): {e}", e.column()),
        )
    })?;
    match record {
        serde_json::Value::Object(fields) => Ok(fields),
        other => Err(jsonl_error(
            path,
            line_no,
            format!("expected a JSON object, found {}", json_type(&other)),
        )),
    }
}

pub(crate) fn jsonl_error(path: &Path, line: usize, message: String) -> DataError {
    DataError::JsonlLine {
        path: PathBuf::from(path),
        line,
        message,
    }
}

/// The sorted field names of a record, for messages.
pub(crate) fn field_list(fields: &serde_json::Map<String, serde_json::Value>) -> String {
    let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys.is_empty() {
        "none".to_owned()
    } else {
        keys.join(", ")
    }
}

/// Whether a `.jsonl` text holds pre-tokenized windows rather than text records: its first
/// record is an object with `input_ids` and without `text_field`. Anything else reads as
/// text (a first line that is not a JSON object is then reported by the text reader).
pub(crate) fn jsonl_holds_ids(content: &str, text_field: &str) -> bool {
    let Some((_, first)) = jsonl_lines(content).next() else {
        return false;
    };
    matches!(
        serde_json::from_str::<serde_json::Value>(first),
        Ok(serde_json::Value::Object(fields))
            if fields.contains_key(IDS_KEY) && !fields.contains_key(text_field)
    )
}

/// The `text_field` strings of the records of `content`, joined with `"\n\n"`.
fn join_jsonl(path: &Path, content: &str, text_field: &str) -> Result<String, DataError> {
    let mut texts: Vec<String> = Vec::new();
    for (line_no, line) in jsonl_lines(content) {
        let mut fields = jsonl_record(path, line_no, line)?;
        match fields.remove(text_field) {
            Some(serde_json::Value::String(s)) => texts.push(s),
            Some(other) => {
                return Err(jsonl_error(
                    path,
                    line_no,
                    format!(
                        "field \"{text_field}\" is {}, expected a string",
                        json_type(&other)
                    ),
                ))
            }
            // The first record decides what the file holds; a later ids record mixes the two.
            None if fields.contains_key(IDS_KEY) => {
                return Err(jsonl_error(
                    path,
                    line_no,
                    format!(
                        "record holds \"{IDS_KEY}\" but no field \"{text_field}\": the file's \
                         first record is text, so every record must be; a .jsonl file holds \
                         either text records or pre-tokenized records, not both"
                    ),
                ))
            }
            None => {
                return Err(jsonl_error(
                    path,
                    line_no,
                    format!(
                        "record has no field \"{text_field}\" (its fields: {})",
                        field_list(&fields)
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
