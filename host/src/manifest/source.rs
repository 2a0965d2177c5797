//! Byte spans → editor positions and key paths, and toml/serde errors → [`ManifestError`].
//!
//! toml's `de::Error` carries only a byte span and a message (its key list is private), so the
//! key path is recovered by finding the span in the parsed document tree.

use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::{Choices, Location, ManifestError};

/// The manifest text and its name, to turn byte spans into [`Location`]s.
pub(crate) struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// 1-based line and character column of byte offset `span.start`.
    pub fn locate(&self, span: &Range<usize>) -> Location {
        let offset = floor_char_boundary(self.text, span.start.min(self.text.len()));
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            file: self.file.to_path_buf(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    pub fn at<T>(&self, spanned: &Spanned<T>) -> Location {
        self.locate(&spanned.span())
    }
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// `quant.override[1].weights`; keys that are not bare TOML keys are quoted.
pub(crate) fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// What sits at a span of the document.
struct Hit {
    path: Vec<Seg>,
    /// The span is the key itself rather than its value.
    on_key: bool,
    /// Type of the value (`"table"`, `"integer"`, ...).
    value_type: &'static str,
}

/// The deepest key or value whose span is exactly `span`.
///
/// Deepest, because a `[[quant.override]]` header is the span of both the array and its
/// element, and the element is what an error inside it is about.
fn find(root: &DeTable<'_>, span: &Range<usize>) -> Option<Hit> {
    fn walk_table(
        t: &DeTable<'_>,
        span: &Range<usize>,
        path: &mut Vec<Seg>,
        best: &mut Option<Hit>,
    ) {
        for (k, v) in t {
            path.push(Seg::Key(k.get_ref().to_string()));
            if k.span() == *span {
                offer(best, path, true, v.get_ref());
            }
            walk_value(v, span, path, best);
            path.pop();
        }
    }
    fn walk_value(
        v: &Spanned<DeValue<'_>>,
        span: &Range<usize>,
        path: &mut Vec<Seg>,
        best: &mut Option<Hit>,
    ) {
        if v.span() == *span {
            offer(best, path, false, v.get_ref());
        }
        match v.get_ref() {
            DeValue::Table(t) => walk_table(t, span, path, best),
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    path.push(Seg::Index(i));
                    walk_value(item, span, path, best);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    fn offer(best: &mut Option<Hit>, path: &[Seg], on_key: bool, value: &DeValue<'_>) {
        if best.as_ref().is_none_or(|b| path.len() > b.path.len()) {
            *best = Some(Hit {
                path: path.to_vec(),
                on_key,
                value_type: value.type_str(),
            });
        }
    }
    let mut best = None;
    walk_table(root, span, &mut Vec::new(), &mut best);
    best
}

/// The value at `path`, for the span of a table header or inline table.
pub(crate) fn span_of(root: &Spanned<DeTable<'_>>, path: &[Seg]) -> Range<usize> {
    let mut cur: Option<&Spanned<DeValue<'_>>> = None;
    for seg in path {
        let next = match (seg, cur.map(|c| c.get_ref())) {
            (Seg::Key(k), None) => root.get_ref().get(k.as_str()),
            (Seg::Key(k), Some(DeValue::Table(t))) => t.get(k.as_str()),
            (Seg::Index(i), Some(DeValue::Array(a))) => a.get(*i),
            _ => None,
        };
        match next {
            Some(v) => cur = Some(v),
            None => break,
        }
    }
    cur.map_or(0..0, |c| c.span())
}

/// Rejects an array where the manifest has a table (`[[model]]`, `model = ["x"]`).
///
/// serde lets a struct be read from a sequence of its fields in order, so without this check
/// `model = ["x"]` would be accepted as `path = "x"` and `[[model]]` would get a confusing
/// "expected a string".
pub(crate) fn check_no_array_tables(
    src: &Source<'_>,
    root: &Spanned<DeTable<'_>>,
) -> Result<(), ManifestError> {
    fn table<'t, 'i>(
        src: &Source<'_>,
        path: &[Seg],
        v: Option<&'t Spanned<DeValue<'i>>>,
    ) -> Result<Option<&'t DeTable<'i>>, ManifestError> {
        match v.map(|v| (v, v.get_ref())) {
            Some((v, DeValue::Array(_))) => Err(ManifestError::WrongType {
                at: src.at(v),
                key: render_path(path),
                expected: "a table".into(),
                found: "an array".into(),
            }),
            Some((_, DeValue::Table(t))) => Ok(Some(t)),
            _ => Ok(None),
        }
    }
    fn key(path: &[Seg], k: &str) -> Vec<Seg> {
        let mut p = path.to_vec();
        p.push(Seg::Key(k.into()));
        p
    }
    /// A `[quant]` or `[[quant.override]]` table: its scheme sub-tables.
    fn scheme_tables(src: &Source<'_>, path: &[Seg], t: &DeTable<'_>) -> Result<(), ManifestError> {
        for k in ["weights", "activations", "kv_cache"] {
            table(src, &key(path, k), t.get(k))?;
        }
        Ok(())
    }
    /// Elements of an array of tables.
    fn elements<'t, 'i>(
        src: &Source<'_>,
        path: &[Seg],
        v: Option<&'t Spanned<DeValue<'i>>>,
    ) -> Result<Vec<(Vec<Seg>, &'t DeTable<'i>)>, ManifestError> {
        let mut out = Vec::new();
        if let Some(DeValue::Array(a)) = v.map(|v| v.get_ref()) {
            for (i, item) in a.iter().enumerate() {
                let mut p = path.to_vec();
                p.push(Seg::Index(i));
                if let Some(t) = table(src, &p, Some(item))? {
                    out.push((p, t));
                }
            }
        }
        Ok(out)
    }

    let root = root.get_ref();
    for k in ["model", "calibration", "export", "eval", "run", "device"] {
        table(src, &key(&[], k), root.get(k))?;
    }
    if let Some(plugins) = table(src, &key(&[], "plugins"), root.get("plugins"))? {
        for (name, pin) in plugins {
            let path = [
                Seg::Key("plugins".into()),
                Seg::Key(name.get_ref().to_string()),
            ];
            table(src, &path, Some(pin))?;
        }
    }
    let quant_path = key(&[], "quant");
    if let Some(quant) = table(src, &quant_path, root.get("quant"))? {
        scheme_tables(src, &quant_path, quant)?;
        let overrides = key(&quant_path, "override");
        for (path, o) in elements(src, &overrides, quant.get("override"))? {
            scheme_tables(src, &path, o)?;
        }
    }
    elements(src, &key(&[], "pipeline"), root.get("pipeline"))?;
    Ok(())
}

/// Turns a toml syntax error into a located [`ManifestError::Syntax`].
pub(crate) fn syntax_error(src: &Source<'_>, err: &toml::de::Error) -> ManifestError {
    ManifestError::Syntax {
        at: src.locate(&err.span().unwrap_or(0..0)),
        message: err.message().to_owned(),
    }
}

/// Turns a deserialization error (unknown key, wrong type, ...) into a [`ManifestError`].
///
/// serde's messages have stable forms (`unknown field `x`, expected one of `a`, `b``,
/// `invalid type: integer `3`, expected a string`, ...); anything else is kept verbatim.
pub(crate) fn de_error(
    src: &Source<'_>,
    root: &Spanned<DeTable<'_>>,
    err: &toml::de::Error,
) -> ManifestError {
    let span = err.span().unwrap_or(0..0);
    let at = src.locate(&span);
    let msg = err.message();
    let hit = find(root.get_ref(), &span);
    let path = hit.as_ref().map(|h| h.path.clone()).unwrap_or_default();
    let key = render_path(&path);

    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let (name, valid) = split_unknown(rest);
        // An unknown key's span is the key itself, so its table is the path minus the key.
        let (table_path, name) = match &hit {
            Some(h) if h.on_key => match h.path.split_last() {
                Some((Seg::Key(k), parent)) => (parent.to_vec(), k.clone()),
                _ => (Vec::new(), name),
            },
            _ => (Vec::new(), name),
        };
        let choices = Choices::new(&name, valid);
        let is_section = table_path.is_empty()
            && hit
                .as_ref()
                .is_some_and(|h| matches!(h.value_type, "table" | "array"));
        return if is_section {
            ManifestError::UnknownSection { at, name, choices }
        } else {
            ManifestError::UnknownKey {
                at,
                table: render_path(&table_path),
                key: name,
                choices,
            }
        };
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        let (value, valid) = split_unknown(rest);
        let choices = Choices::new(&value, valid);
        return ManifestError::UnknownValue {
            at,
            key,
            value,
            choices,
        };
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return ManifestError::MissingKey {
            at,
            table: key,
            key: backticked(rest).unwrap_or_default(),
        };
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return ManifestError::WrongType {
                at,
                expected: expected_text(expected, &key),
                found: found_text(found),
                key,
            };
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return ManifestError::Invalid {
                at,
                key,
                value: found_text(found),
                reason: format!("expected {}", expected_text(expected, "")),
            };
        }
    }
    // toml's own message for a non-string where a unit enum (a preset name, ...) is expected.
    if msg == "wanted string or table" {
        let found = hit.as_ref().map_or("something else", |h| h.value_type);
        return ManifestError::WrongType {
            at,
            key,
            expected: "a string".into(),
            found: found_text(found),
        };
    }
    ManifestError::Other {
        at,
        key,
        message: msg.to_owned(),
    }
}

/// `` `x`, expected one of `a`, `b` `` → (`x`, [a, b]); also the `expected `a` or `b``,
/// `expected `a`` and `there are no fields` forms.
fn split_unknown(rest: &str) -> (String, Vec<String>) {
    // The name ends at the first "`, " (the candidate list after it has more of them).
    let (name, tail) = match rest.get(1..).and_then(|r| r.find("`, ")) {
        Some(i) => (&rest[..i + 1], &rest[i + 4..]),
        None => (rest.trim_end_matches('`'), ""),
    };
    let name = name.strip_prefix('`').unwrap_or(name).to_owned();
    let valid = tail
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    (name, valid)
}

fn backticked(s: &str) -> Option<String> {
    let s = s.strip_prefix('`')?;
    Some(s[..s.rfind('`')?].to_owned())
}

/// serde's Rust-flavoured expectations in TOML words.
fn expected_text(expected: &str, key: &str) -> String {
    let ints = [
        "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "usize", "isize",
    ];
    if ints.contains(&expected) {
        "an integer".into()
    } else if expected == "a sequence" && !key.is_empty() {
        // The usual cause is `[pipeline]` written for `[[pipeline]]`.
        format!("an array of tables ([[{key}]])")
    } else if expected == "a sequence" {
        "an array".into()
    } else if expected == "a map" || expected.starts_with("struct ") {
        "a table".into()
    } else if expected.starts_with("enum ") {
        "a string".into()
    } else {
        expected.into()
    }
}

fn found_text(found: &str) -> String {
    match found {
        "map" | "table" | "inline table" => "a table".into(),
        "sequence" | "array" => "an array".into(),
        "floating point" | "float" => "a float".into(),
        "integer" => "an integer".into(),
        "boolean" => "a boolean".into(),
        "datetime" => "a datetime".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_counts_lines_and_characters_from_one() {
        let src = Source {
            file: Path::new("m.toml"),
            text: "a = 1\nbé = 'x'\r\nc = 2\n",
        };
        let at = src.locate(&(src.text.find("'x'").unwrap_or(0)..0));
        assert_eq!(
            (at.line, at.column),
            (2, 6),
            "é is one column though two bytes"
        );
        let at = src.locate(&(src.text.find('c').unwrap_or(0)..0));
        assert_eq!((at.line, at.column), (3, 1));
        assert_eq!(src.locate(&(0..0)).to_string(), "m.toml:1:1");
        // Past the end (an error at EOF) stays on the last line.
        let at = src.locate(&(999..999));
        assert_eq!((at.line, at.column), (4, 1));
    }

    #[test]
    fn split_unknown_handles_all_serde_forms() {
        let (n, v) = split_unknown("`nsample`, expected one of `dataset`, `nsamples`, `seed`");
        assert_eq!(n, "nsample");
        assert_eq!(v, ["dataset", "nsamples", "seed"]);
        let (n, v) = split_unknown("`x`, expected `a` or `b`");
        assert_eq!((n.as_str(), v), ("x", vec!["a".to_owned(), "b".to_owned()]));
        let (n, v) = split_unknown("`x`, expected `path`");
        assert_eq!((n.as_str(), v), ("x", vec!["path".to_owned()]));
        let (n, v) = split_unknown("`x`, there are no fields");
        assert_eq!((n.as_str(), v.len()), ("x", 0));
    }

    #[test]
    fn render_path_quotes_non_bare_keys() {
        let p = [
            Seg::Key("plugins".into()),
            Seg::Key("my.plugin".into()),
            Seg::Key("quant".into()),
            Seg::Index(2),
        ];
        assert_eq!(render_path(&p), "plugins.\"my.plugin\".quant[2]");
    }
}
