//! Token data: the model's tokenizer, text sources, calibration windows and evaluation
//! windows. Calibration and evaluation share one code path (read → tokenize once → cut), and
//! every step reproduces Python/transformers exactly.
//!
//! # Text
//! - A plain file (any name but `*.jsonl` / `*.json`) is read as UTF-8 **as is**: no newline
//!   translation, no Unicode normalisation, a BOM kept. Python equivalent:
//!   `open(path, "rb").read().decode("utf-8")`.
//! - A `*.jsonl` file of text records (pre-tokenized ones: below) holds one JSON object per
//!   line (lines split on `\n`); each record's string field `text_field` is taken, blank
//!   (whitespace-only) lines are skipped, and the records are joined with `"\n\n"`. Python
//!   equivalent:
//!   `"\n\n".join(json.loads(l)[field] for l in open(path, encoding="utf-8", newline="\n") if l.strip())`.
//! - An empty or whitespace-only text is an error.
//!
//! # Tokenization
//! [`Tokenizer`] loads `<model dir>/tokenizer.json` with the `tokenizers` crate and encodes
//! with the tokenizer's default special tokens, like transformers' `tok(text).input_ids`
//! (`add_special_tokens=True`; stories260K prepends BOS 1, SmolLM2 adds nothing). Truncation
//! and padding stored in the file are cleared, as transformers does. The whole text is
//! tokenized once.
//!
//! # Calibration windows ([`calibration_windows`])
//! The GPTQ procedure, with CPython's Mersenne Twister ([`PyRandom`], bit-exact):
//! ```python
//! ids = tok(text).input_ids
//! random.seed(seed)                      # seed: a non-negative int
//! windows = []
//! for _ in range(nsamples):
//!     i = random.randint(0, len(ids) - seqlen - 1)
//!     windows.append(ids[i:i + seqlen])  # no other calls to random in between
//! ```
//! The text needs at least `seqlen + 1` tokens. With stories260K, `tinystories-sample.txt`,
//! 16 × 64 and seed 0 this reproduces `shared/reference/calib/stories260K-tinystories-16x64.json`
//! exactly (tested).
//!
//! Pre-tokenized windows, so a run uses exactly the tokens another tool used:
//! - a `*.json` dataset is `{"input_ids": [[id, ...], ...]}` (the format of the reference
//!   calibration files);
//! - a `*.jsonl` dataset whose **first record** is an object with `input_ids` and without the
//!   text field (`text_field`) holds one window per line, `{"input_ids": [id, ...]}`; other
//!   fields (e.g. `attention_mask`) are ignored and blank lines skipped. Every record must then
//!   be such a record: one with the text field, or without `input_ids`, is an error naming its
//!   line (a file mixes text and ids). A first record with the text field makes a text file,
//!   where a later ids record is the same error.
//!
//! In both, every window must have exactly `seqlen` ids (windows are used as written, never
//! cut or padded), there must be at least `nsamples`, and the first `nsamples` are used in
//! order; the seed is not used. When a vocabulary size is given, every id of either kind must
//! be below it (a `.jsonl` error names the line).
//!
//! # Evaluation windows ([`eval_windows`])
//! Non-overlapping `ids[w*seqlen:(w+1)*seqlen]`, the incomplete tail dropped, the first
//! `max_windows` of them; each window is an independent sequence (no BOS inserted).

mod error;
mod random;
mod text;
mod tokenizer;
mod windows;

pub use error::DataError;
pub use random::PyRandom;
pub use text::{read_text, TextKind};
pub use tokenizer::Tokenizer;
pub use windows::{
    calibration_windows, eval_windows, read_id_windows, sample_windows, CalibrationSpec, Windows,
};

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;

    /// The stories260K model directory, relative to `shared/`.
    pub(crate) const STORIES: &str = "models/stories260K";
    /// The SmolLM2 tokenizer (its weights may be absent), relative to `shared/`.
    pub(crate) const SMOL_TOKENIZER: &str = "models/SmolLM2-135M-q41dq/tokenizer.json";

    /// `rel` under the shared reference assets, which sit beside the workspace
    /// (`<workspace>/../shared`; CARGO_MANIFEST_DIR is `host/`).
    pub(crate) fn shared(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared")
            .join(rel)
    }
}
