//! Manifest errors: every variant names the file, line and column and the key path, so the
//! user can jump straight to the offending text.

use std::fmt;
use std::path::PathBuf;

/// A position in a manifest file, as an editor shows it: 1-based line and 1-based column
/// counted in characters (not bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A value read from the manifest together with where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Located<T> {
    pub value: T,
    pub at: Location,
}

/// What an unknown name could have been. Boxed in the error so `Result<_, ManifestError>`
/// stays small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choices {
    /// The valid name closest to the unknown one, when close enough to be a typo.
    pub suggestion: Option<String>,
    /// Every valid name, in documentation order.
    pub valid: Vec<String>,
    /// Extra explanation, e.g. that a known format is not supported by this version.
    pub note: Option<String>,
}

impl Choices {
    /// Choices among `valid`, suggesting the one closest to `input`.
    pub(crate) fn new(input: &str, valid: Vec<String>) -> Box<Choices> {
        let suggestion = closest(input, valid.iter().map(String::as_str)).map(str::to_owned);
        Box::new(Choices {
            suggestion,
            valid,
            note: None,
        })
    }
}

/// Everything that can go wrong while loading a manifest.
///
/// `key` fields hold the dotted key path (`quant.override[1].weights.bits`, array indices from
/// 0); `table` fields hold the path of the enclosing table (`""` for the top level).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{at}: TOML syntax error: {message}")]
    Syntax { at: Location, message: String },

    #[error(
        "{at}: unknown key `{key}` {}{} (valid keys: {})",
        table_label(.table),
        did_you_mean(.choices.suggestion.as_deref(), false),
        .choices.valid.join(", ")
    )]
    UnknownKey {
        at: Location,
        table: String,
        key: String,
        choices: Box<Choices>,
    },

    #[error(
        "{at}: unknown section [{name}]{} (valid sections: {})",
        did_you_mean(.choices.suggestion.as_deref(), true),
        .choices.valid.join(", ")
    )]
    UnknownSection {
        at: Location,
        name: String,
        choices: Box<Choices>,
    },

    #[error(
        "{at}: unknown value `{value}` for `{key}`{} ({}valid values: {})",
        did_you_mean(.choices.suggestion.as_deref(), false),
        .choices.note.as_deref().map(|n| format!("{n}; ")).unwrap_or_default(),
        .choices.valid.join(", ")
    )]
    UnknownValue {
        at: Location,
        key: String,
        value: String,
        choices: Box<Choices>,
    },

    #[error("{at}: {}", missing_text(.table, .key))]
    MissingKey {
        at: Location,
        table: String,
        key: String,
    },

    #[error("{at}: wrong type for `{key}`: expected {expected}, found {found}")]
    WrongType {
        at: Location,
        key: String,
        expected: String,
        found: String,
    },

    /// A value of the right type that fails validation (`bits = 9`, `group_size = 0`, ...).
    #[error("{at}: `{key}` = {value} is invalid: {reason}")]
    Invalid {
        at: Location,
        key: String,
        value: String,
        reason: String,
    },

    #[error("{at}: invalid regex in `{key}` = {pattern:?}: {source}")]
    BadRegex {
        at: Location,
        key: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },

    /// Two keys that cannot be given together (`skip = true` with `weights`, ...).
    #[error("{at}: `{key}` cannot be combined with `{other}`: {reason}")]
    Conflict {
        at: Location,
        key: String,
        other: String,
        reason: String,
    },

    /// A table lacks what it needs to mean anything (`[quant]` without `scheme` or weights).
    #[error("{at}: {message}")]
    Incomplete {
        at: Location,
        table: String,
        message: String,
    },

    #[error(
        "{at}: the manifest has no [[pipeline]] stages; add at least one, e.g. \
         `[[pipeline]]` with `algorithm = \"rtn\"`"
    )]
    EmptyPipeline { at: Location },

    /// A deserialization error whose message has no form we recognise; kept verbatim.
    #[error("{at}: `{key}`: {message}")]
    Other {
        at: Location,
        key: String,
        message: String,
    },
}

impl ManifestError {
    /// Where in the manifest the error is, when it concerns its content.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ManifestError::Read { .. } => None,
            ManifestError::Syntax { at, .. }
            | ManifestError::UnknownKey { at, .. }
            | ManifestError::UnknownSection { at, .. }
            | ManifestError::UnknownValue { at, .. }
            | ManifestError::MissingKey { at, .. }
            | ManifestError::WrongType { at, .. }
            | ManifestError::Invalid { at, .. }
            | ManifestError::BadRegex { at, .. }
            | ManifestError::Conflict { at, .. }
            | ManifestError::Incomplete { at, .. }
            | ManifestError::EmptyPipeline { at }
            | ManifestError::Other { at, .. } => Some(at),
        }
    }
}

/// `[calibration]` for plain tables; array elements have no header syntax of their own, so
/// `quant.override[1].weights` is shown as a key path.
pub(crate) fn table_label(table: &str) -> String {
    if table.is_empty() {
        "at the top level".to_owned()
    } else if table.contains('[') {
        format!("in `{table}`")
    } else {
        format!("in [{table}]")
    }
}

fn did_you_mean(suggestion: Option<&str>, bracketed: bool) -> String {
    match suggestion {
        Some(s) if bracketed => format!("; did you mean [{s}]?"),
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    }
}

fn missing_text(table: &str, key: &str) -> String {
    if table.is_empty() {
        format!("missing required section [{key}]")
    } else {
        format!("missing required key `{key}` {}", table_label(table))
    }
}

/// The candidate closest to `input` by edit distance, if it is close enough to be a typo.
///
/// Case is ignored (`W4A16` suggests `w4a16`); the limit of a third of the length keeps
/// `nsample` → `nsamples` and `calibrate` → `calibration` but rejects unrelated words.
pub(crate) fn closest<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = input.to_lowercase();
    let limit = (lower.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_accepts_typos_and_rejects_unrelated_words() {
        let keys = ["dataset", "nsamples", "seqlen", "seed", "text_field"];
        assert_eq!(closest("nsample", keys), Some("nsamples"));
        assert_eq!(closest("textfield", keys), Some("text_field"));
        assert_eq!(closest("W4A61", ["w8a16", "w4a16"]), Some("w4a16"));
        assert_eq!(closest("banana", keys), None);
        assert_eq!(closest("x", keys), None);
    }

    #[test]
    fn errors_stay_small() {
        // Large error types make every `Result` carrying them large (clippy::result_large_err).
        assert!(std::mem::size_of::<ManifestError>() <= 128);
    }

    #[test]
    fn table_labels() {
        assert_eq!(table_label(""), "at the top level");
        assert_eq!(table_label("quant.weights"), "in [quant.weights]");
        assert_eq!(table_label("quant.override[2]"), "in `quant.override[2]`");
    }
}
