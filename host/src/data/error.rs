//! Errors of tokenization, text reading and window building. Every variant names the file
//! (and line, window or position) at fault and what was expected.

use std::path::PathBuf;

/// An error loading a tokenizer, reading a text or ids file, or building windows.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// `tokenizer.json` does not exist.
    #[error(
        "{}: file not found (gs-host tokenizes with the model's Hugging Face tokenizer.json)",
        path.display()
    )]
    TokenizerMissing {
        /// Where it was looked for.
        path: PathBuf,
    },

    /// `tokenizer.json` exists but the `tokenizers` library cannot build a tokenizer from it.
    #[error("{}: not a loadable Hugging Face tokenizer: {reason}", path.display())]
    TokenizerLoad {
        /// The tokenizer file.
        path: PathBuf,
        /// The library's message.
        reason: String,
    },

    /// The tokenizer failed on a text.
    #[error("tokenizer {}: cannot encode the text: {reason}", path.display())]
    Encode {
        /// The tokenizer file.
        path: PathBuf,
        /// The library's message.
        reason: String,
    },

    /// An I/O error on a file that should be readable.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A text file is not valid UTF-8.
    #[error("{}: invalid UTF-8 at byte offset {offset} (texts must be UTF-8)", path.display())]
    Utf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid byte (0-based).
        offset: usize,
    },

    /// A line of a `.jsonl` file is not a JSON object with a string field `text_field`.
    #[error("{}, line {line}: {message}", path.display())]
    JsonlLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and what was expected.
        message: String,
    },

    /// A text source holds no text.
    #[error("{}: {what}", path.display())]
    EmptyText {
        /// The file.
        path: PathBuf,
        /// Why there is nothing ("the file is empty", "no records", ...).
        what: String,
    },

    /// The text is too short for one calibration window.
    #[error(
        "{}: the text has {tokens} tokens; a calibration window of {seqlen} needs at least \
         {needed} (seqlen + 1)",
        path.display()
    )]
    TooFewTokens {
        /// The text file.
        path: PathBuf,
        /// Tokens in the whole text.
        tokens: usize,
        /// Requested window length.
        seqlen: usize,
        /// `seqlen + 1`.
        needed: usize,
    },

    /// A calibration setting is unusable on its own (zero samples, zero length, ...).
    #[error("calibration {key} = {value}: expected {expected}")]
    InvalidSpec {
        /// The setting.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },

    /// A pre-tokenized ids file does not parse as JSON.
    #[error("invalid JSON in {} at line {line}, column {column}: {message}", path.display())]
    IdsJson {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the parser expected.
        message: String,
    },

    /// A pre-tokenized ids file is JSON of the wrong shape.
    #[error("{}: {message}", path.display())]
    IdsFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong and what was expected.
        message: String,
    },

    /// A window of a pre-tokenized ids file has the wrong length.
    #[error(
        "{}: input_ids[{window}] has {found} ids, expected seqlen = {expected}",
        path.display()
    )]
    IdsWindowLength {
        /// The file.
        path: PathBuf,
        /// 0-based window index.
        window: usize,
        /// Its length.
        found: usize,
        /// The requested seqlen.
        expected: usize,
    },

    /// A pre-tokenized ids file has fewer windows than requested.
    #[error("{}: input_ids has {found} windows, nsamples = {needed} requested", path.display())]
    IdsTooFew {
        /// The file.
        path: PathBuf,
        /// Windows in the file.
        found: usize,
        /// Requested samples.
        needed: usize,
    },

    /// A token id is not below the model's vocabulary size.
    #[error(
        "{}: {location} is {id}, not below the vocabulary size {vocab_size}",
        path.display()
    )]
    IdOutOfVocab {
        /// The ids or text file.
        path: PathBuf,
        /// Where, e.g. "token 17 of calibration window 3" (both 0-based).
        location: String,
        /// The id.
        id: u32,
        /// The vocabulary size given.
        vocab_size: usize,
    },
}
