//! Fixed-length token windows: calibration samples (GPTQ-style random windows, or a
//! pre-tokenized ids file) and evaluation windows (non-overlapping).

use std::path::{Path, PathBuf};

use super::random::PyRandom;
use super::text::{
    field_list, has_extension, json_type, jsonl_error, jsonl_holds_ids, jsonl_lines, jsonl_record,
    read_utf8, text_of, TextKind, IDS_KEY,
};
use super::{DataError, Tokenizer};

/// `n` windows of `seqlen` token ids each, stored row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    seqlen: usize,
    ids: Vec<u32>,
}

impl Windows {
    /// Windows from row-major `ids`; `None` unless `seqlen > 0` and `seqlen` divides
    /// `ids.len()` (an empty set with `seqlen == 0` is allowed).
    pub fn new(seqlen: usize, ids: Vec<u32>) -> Option<Self> {
        let fits = if seqlen == 0 {
            ids.is_empty()
        } else {
            ids.len() % seqlen == 0
        };
        fits.then_some(Self { seqlen, ids })
    }

    /// Length of every window.
    pub fn seqlen(&self) -> usize {
        self.seqlen
    }

    /// Number of windows.
    pub fn n(&self) -> usize {
        self.ids.len().checked_div(self.seqlen).unwrap_or(0)
    }

    /// Window `i`. Panics if `i >= n()`, like slice indexing.
    pub fn window(&self, i: usize) -> &[u32] {
        &self.ids[i * self.seqlen..(i + 1) * self.seqlen]
    }

    /// The windows in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u32]> + '_ {
        (0..self.n()).map(|i| self.window(i))
    }

    /// All ids, `n() × seqlen()` row-major.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Where calibration windows come from and how many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibrationSpec {
    /// A text file (plain UTF-8, or `.jsonl` text records), or pre-tokenized windows: a
    /// `.json` file `{"input_ids": [[...], ...]}` or a `.jsonl` file of `{"input_ids": [...]}`
    /// records (see the [`crate::data`] documentation for how a `.jsonl` file is told apart).
    pub dataset: PathBuf,
    /// The string field of each `.jsonl` text record (ignored for other files).
    pub text_field: String,
    /// Number of windows.
    pub nsamples: usize,
    /// Tokens per window.
    pub seqlen: usize,
    /// Python `random.seed(seed)` before drawing window starts (text datasets only).
    pub seed: u64,
    /// When set, every id must be below it (the model's embedding rows).
    pub vocab_size: Option<usize>,
}

/// The calibration windows of `spec`: drawn from the tokenized text, or read from an ids file.
/// See the module documentation of [`crate::data`] for the exact procedure.
pub fn calibration_windows(
    spec: &CalibrationSpec,
    tokenizer: &Tokenizer,
) -> Result<Windows, DataError> {
    if spec.nsamples == 0 {
        return Err(DataError::InvalidSpec {
            key: "nsamples",
            value: "0".to_owned(),
            expected: "at least 1",
        });
    }
    if spec.seqlen == 0 {
        return Err(seqlen_zero());
    }
    let path = &spec.dataset;
    let (windows, lines) = if has_extension(path, "json") {
        (read_id_windows(path, spec.nsamples, spec.seqlen)?, None)
    } else {
        let content = read_utf8(path)?;
        if has_extension(path, "jsonl") && jsonl_holds_ids(&content, &spec.text_field) {
            let (windows, lines) =
                jsonl_id_windows(path, &content, &spec.text_field, spec.nsamples, spec.seqlen)?;
            (windows, Some(lines))
        } else {
            let text = text_of(path, content, &TextKind::for_path(path, &spec.text_field))?;
            let ids = tokenizer.encode(&text)?;
            tracing::info!(
                "calibration: {} tokens in {}; {} random windows of {} (seed {})",
                ids.len(),
                path.display(),
                spec.nsamples,
                spec.seqlen,
                spec.seed
            );
            let windows = sample_windows(path, &ids, spec.nsamples, spec.seqlen, spec.seed)?;
            (windows, None)
        }
    };
    if let Some(vocab_size) = spec.vocab_size {
        check_vocab(path, &windows, lines.as_deref(), vocab_size)?;
    }
    Ok(windows)
}

/// The first `nsamples` windows of a `.jsonl` file of pre-tokenized records, one
/// `{"input_ids": [id, ...]}` per line, and the 1-based line of each window. Every record
/// must hold `input_ids` of exactly `seqlen` token ids (windows are used as written, never cut
/// or padded) and no `text_field`; other fields are ignored. Every record is checked, not just
/// the ones used.
fn jsonl_id_windows(
    path: &Path,
    content: &str,
    text_field: &str,
    nsamples: usize,
    seqlen: usize,
) -> Result<(Windows, Vec<usize>), DataError> {
    let mut ids = Vec::with_capacity(nsamples * seqlen);
    let mut lines = Vec::with_capacity(nsamples);
    let mut records = 0usize;
    for (line_no, line) in jsonl_lines(content) {
        let bad = |message: String| jsonl_error(path, line_no, message);
        let fields = jsonl_record(path, line_no, line)?;
        if fields.contains_key(text_field) {
            return Err(bad(format!(
                "record holds a text field \"{text_field}\": the file's first record is \
                 pre-tokenized ({IDS_KEY}), so every record must be; a .jsonl file holds either \
                 text records or pre-tokenized records, not both"
            )));
        }
        let Some(row) = fields.get(IDS_KEY) else {
            return Err(bad(format!(
                "record has no field \"{IDS_KEY}\" (its fields: {}); the file's first record is \
                 pre-tokenized, so every record must hold {IDS_KEY}",
                field_list(&fields)
            )));
        };
        let Some(row) = row.as_array() else {
            return Err(bad(format!(
                "\"{IDS_KEY}\" is {}, expected a list of token ids",
                json_type(row)
            )));
        };
        if row.len() != seqlen {
            return Err(bad(format!(
                "\"{IDS_KEY}\" has {} ids, expected seqlen = {seqlen} (pre-tokenized windows \
                 are used as written, never cut or padded)",
                row.len()
            )));
        }
        let used = records < nsamples;
        for (p, v) in row.iter().enumerate() {
            let id = v
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "{IDS_KEY}[{p}] is {v}, expected a token id (an integer in 0..2^32)"
                    ))
                })?;
            if used {
                ids.push(id);
            }
        }
        if used {
            lines.push(line_no);
        }
        records += 1;
    }
    if records < nsamples {
        return Err(DataError::IdsTooFew {
            path: path.to_path_buf(),
            found: records,
            needed: nsamples,
        });
    }
    Ok((Windows { seqlen, ids }, lines))
}

/// GPTQ-style sampling: `random.seed(seed)`; for each sample
/// `i = random.randint(0, len(ids) - seqlen - 1)`, window `ids[i..i + seqlen]`.
/// `path` only names the text in errors.
pub fn sample_windows(
    path: &Path,
    ids: &[u32],
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<Windows, DataError> {
    if seqlen == 0 {
        return Err(seqlen_zero());
    }
    let needed = seqlen.saturating_add(1);
    if ids.len() < needed {
        return Err(DataError::TooFewTokens {
            path: path.to_path_buf(),
            tokens: ids.len(),
            seqlen,
            needed,
        });
    }
    let last_start = (ids.len() - needed) as u64;
    let mut rng = PyRandom::new(seed);
    let mut out = Vec::with_capacity(nsamples * seqlen);
    for _ in 0..nsamples {
        // randint(0, b) with b < u64::MAX always answers; the index fits usize as it is
        // at most len(ids) - seqlen - 1.
        let start = rng.randint(0, last_start).unwrap_or(0) as usize;
        out.extend_from_slice(&ids[start..start + seqlen]);
    }
    Ok(Windows { seqlen, ids: out })
}

/// The first `nsamples` windows of a pre-tokenized ids file `{"input_ids": [[id, ...], ...]}`;
/// every window of the file must hold exactly `seqlen` non-negative integer ids.
pub fn read_id_windows(path: &Path, nsamples: usize, seqlen: usize) -> Result<Windows, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| DataError::IdsJson {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
    let format = |message: String| DataError::IdsFormat {
        path: path.to_path_buf(),
        message,
    };
    let Some(rows) = json.get("input_ids") else {
        return Err(format(
            "no key \"input_ids\" (expected {\"input_ids\": [[id, ...], ...]}, a list of \
             windows of token ids)"
                .to_owned(),
        ));
    };
    let Some(rows) = rows.as_array() else {
        return Err(format(format!(
            "\"input_ids\" is {}, expected a list of windows (lists of token ids)",
            json_type(rows)
        )));
    };
    // Every window is checked, not just the ones used, so a malformed file never passes.
    for (w, row) in rows.iter().enumerate() {
        let Some(row) = row.as_array() else {
            return Err(format(format!(
                "input_ids[{w}] is {}, expected a list of token ids",
                json_type(row)
            )));
        };
        if row.len() != seqlen {
            return Err(DataError::IdsWindowLength {
                path: path.to_path_buf(),
                window: w,
                found: row.len(),
                expected: seqlen,
            });
        }
    }
    if rows.len() < nsamples {
        return Err(DataError::IdsTooFew {
            path: path.to_path_buf(),
            found: rows.len(),
            needed: nsamples,
        });
    }
    let mut ids = Vec::with_capacity(nsamples * seqlen);
    for (w, row) in rows.iter().take(nsamples).enumerate() {
        for (p, v) in row.as_array().into_iter().flatten().enumerate() {
            let id = v
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    format(format!(
                        "input_ids[{w}][{p}] is {v}, expected a token id (an integer in 0..2^32)"
                    ))
                })?;
            ids.push(id);
        }
    }
    Ok(Windows { seqlen, ids })
}

fn seqlen_zero() -> DataError {
    DataError::InvalidSpec {
        key: "seqlen",
        value: "0".to_owned(),
        expected: "at least 1",
    }
}

/// Every id of `windows` must be below `vocab_size`. `lines` are the 1-based lines the
/// windows were read from (a `.jsonl` ids file), to name a bad id's place.
fn check_vocab(
    path: &Path,
    windows: &Windows,
    lines: Option<&[usize]>,
    vocab_size: usize,
) -> Result<(), DataError> {
    for (w, window) in windows.iter().enumerate() {
        if let Some((p, &id)) = window
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab_size)
        {
            let location = match lines.and_then(|l| l.get(w)) {
                Some(line) => format!("line {line}: {IDS_KEY}[{p}]"),
                None => format!("token {p} of calibration window {w} (0-based)"),
            };
            return Err(DataError::IdOutOfVocab {
                path: path.to_path_buf(),
                location,
                id,
                vocab_size,
            });
        }
    }
    Ok(())
}

/// Evaluation windows: non-overlapping `ids[w·seqlen .. (w+1)·seqlen]`, the incomplete tail
/// dropped, at most `max_windows` of them (the first ones). `seqlen == 0` gives no windows.
pub fn eval_windows(ids: &[u32], seqlen: usize, max_windows: Option<usize>) -> Windows {
    if seqlen == 0 {
        return Windows {
            seqlen,
            ids: Vec::new(),
        };
    }
    let full = ids.len() / seqlen;
    let n = max_windows.map_or(full, |k| k.min(full));
    Windows {
        seqlen,
        ids: ids[..n * seqlen].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::read_text;
    use crate::data::testutil::{shared, STORIES};

    const TINYSTORIES: &str = "data/tinystories/tinystories-sample.txt";

    fn stories_tokenizer() -> Tokenizer {
        Tokenizer::from_model_dir(&shared(STORIES)).unwrap()
    }

    fn spec(dataset: PathBuf, nsamples: usize, seqlen: usize) -> CalibrationSpec {
        CalibrationSpec {
            dataset,
            text_field: "text".to_owned(),
            nsamples,
            seqlen,
            seed: 0,
            vocab_size: None,
        }
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Golden: shared/reference/calib/stories260K-tinystories-16x64.json was made with
    /// transformers + Python `random.seed(0)` by the procedure in shared/reference/README.md,
    /// "Calibration windows".
    #[test]
    fn tinystories_16x64_seed_0_reproduces_the_reference_windows() {
        let tok = stories_tokenizer();
        let got = calibration_windows(&spec(shared(TINYSTORIES), 16, 64), &tok).unwrap();
        let reference = shared("reference/calib/stories260K-tinystories-16x64.json");
        let expected = read_id_windows(&reference, 16, 64).unwrap();
        assert_eq!(got.n(), 16);
        assert_eq!(got.seqlen(), 64);
        assert_eq!(got, expected);
        // The reference file fed back through the ids path gives the same windows.
        let mut from_file = spec(reference, 16, 64);
        from_file.vocab_size = Some(512);
        assert_eq!(calibration_windows(&from_file, &tok).unwrap(), expected);
    }

    #[test]
    fn jsonl_and_plain_text_of_the_same_content_give_the_same_windows() {
        let tok = stories_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let plain = write(&dir, "t.txt", b"Once upon a time.\n\nThe end of the tale.");
        let jsonl = write(
            &dir,
            "t.jsonl",
            b"{\"body\": \"Once upon a time.\"}\n{\"body\": \"The end of the tale.\"}\n",
        );
        let a = calibration_windows(&spec(plain, 3, 4), &tok).unwrap();
        let mut s = spec(jsonl, 3, 4);
        s.text_field = "body".to_owned();
        let b = calibration_windows(&s, &tok).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.n(), 3);
    }

    #[test]
    fn sampling_draws_starts_like_python_randint() {
        // ids = list(range(20)); random.seed(0); starts of randint(0, 20 - 5 - 1), 4 times:
        // python3 -c "import random; random.seed(0); print([random.randint(0, 14) for _ in range(4)])"
        // -> [13, 6, 12, 14]
        let ids: Vec<u32> = (0..20).collect();
        let w = sample_windows(Path::new("x"), &ids, 4, 5, 0).unwrap();
        let starts: Vec<u32> = w.iter().map(|win| win[0]).collect();
        assert_eq!(starts, [13, 6, 12, 14]);
        assert_eq!(w.window(1), &[6, 7, 8, 9, 10]);
    }

    #[test]
    fn a_text_with_exactly_seqlen_plus_one_tokens_is_enough_and_seqlen_is_not() {
        let ids: Vec<u32> = (0..9).collect();
        let w = sample_windows(Path::new("x"), &ids, 2, 8, 0).unwrap();
        assert_eq!(w.ids().len(), 16);
        let err = sample_windows(Path::new("short.txt"), &ids[..8], 1, 8, 0).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TooFewTokens {
                    tokens: 8,
                    needed: 9,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("short.txt") && msg.contains("8 tokens"),
            "{msg}"
        );
        assert!(msg.contains("at least 9"), "{msg}");
    }

    #[test]
    fn a_short_text_file_names_its_token_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "short.txt", b"Hi.");
        let err = calibration_windows(&spec(path, 1, 64), &stories_tokenizer()).unwrap_err();
        assert!(
            matches!(err, DataError::TooFewTokens { needed: 65, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn zero_samples_or_zero_length_are_refused() {
        let tok = stories_tokenizer();
        let err = calibration_windows(&spec(shared(TINYSTORIES), 0, 64), &tok).unwrap_err();
        assert!(err.to_string().contains("nsamples = 0"), "{err}");
        let err = calibration_windows(&spec(shared(TINYSTORIES), 4, 0), &tok).unwrap_err();
        assert!(err.to_string().contains("seqlen = 0"), "{err}");
    }

    #[test]
    fn ids_file_uses_the_first_nsamples_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "ids.json",
            br#"{"input_ids": [[1, 2], [3, 4], [5, 6]]}"#,
        );
        let w = read_id_windows(&path, 2, 2).unwrap();
        assert_eq!(w.ids(), &[1, 2, 3, 4]);
        assert_eq!(w.window(1), &[3, 4]);
    }

    #[test]
    fn ids_file_errors_are_precise() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], usize, &str); 7] = [
            (b"{\"input_ids\": [[1, 2],", 1, "invalid JSON in"),
            (b"{\"ids\": []}", 1, "no key \"input_ids\""),
            (
                b"{\"input_ids\": {}}",
                1,
                "\"input_ids\" is an object, expected a list",
            ),
            (
                b"{\"input_ids\": [[1, 2], 7]}",
                1,
                "input_ids[1] is a number",
            ),
            (
                b"{\"input_ids\": [[1, 2], [3]]}",
                1,
                "input_ids[1] has 1 ids, expected seqlen = 2",
            ),
            (
                b"{\"input_ids\": [[1, 2]]}",
                2,
                "input_ids has 1 windows, nsamples = 2",
            ),
            (
                b"{\"input_ids\": [[1, -2]]}",
                1,
                "input_ids[0][1] is -2, expected a token id",
            ),
        ];
        for (bytes, nsamples, needle) in cases {
            let path = write(&dir, "ids.json", bytes);
            let err = read_id_windows(&path, nsamples, 2).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("ids.json") && msg.contains(needle),
                "{needle:?} in {msg}"
            );
        }
    }

    #[test]
    fn ids_at_or_above_the_vocab_size_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "ids.json", br#"{"input_ids": [[1, 2], [3, 512]]}"#);
        let mut s = spec(path, 2, 2);
        s.vocab_size = Some(512);
        let err = calibration_windows(&s, &stories_tokenizer()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::IdOutOfVocab {
                    id: 512,
                    vocab_size: 512,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("token 1 of calibration window 1"),
            "{err}"
        );
        s.vocab_size = Some(513);
        assert!(calibration_windows(&s, &stories_tokenizer()).is_ok());
    }

    /// One `{"input_ids": [...]}` line per window.
    fn jsonl_of(rows: &[&[i64]]) -> Vec<u8> {
        rows.iter()
            .map(|r| format!("{{\"input_ids\": {r:?}}}\n"))
            .collect::<String>()
            .into_bytes()
    }

    /// The reference windows written as JSON Lines read back as the same windows as the
    /// `.json` file itself (the rule in the module docs: same checks, first nsamples in order).
    #[test]
    fn jsonl_ids_file_gives_the_same_windows_as_the_json_file() {
        let reference = shared("reference/calib/stories260K-tinystories-16x64.json");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&reference).unwrap()).unwrap();
        let mut text = String::new();
        for row in json["input_ids"].as_array().unwrap() {
            text.push_str(&serde_json::json!({ "input_ids": row }).to_string());
            text.push('\n');
        }
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "ids.jsonl", text.as_bytes());
        let tok = stories_tokenizer();
        for n in [16, 5] {
            let mut s = spec(path.clone(), n, 64);
            s.vocab_size = Some(512);
            let got = calibration_windows(&s, &tok).unwrap();
            assert_eq!(
                got,
                read_id_windows(&reference, n, 64).unwrap(),
                "nsamples {n}"
            );
        }
    }

    #[test]
    fn jsonl_ids_skip_blank_lines_ignore_other_fields_and_use_the_first_nsamples() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "ids.jsonl",
            b"{\"input_ids\": [1, 2, 3], \"attention_mask\": [1, 1, 1]}\n\n  \r\n{\"input_ids\": [4, 5, 6]}\r\n{\"input_ids\": [7, 8, 9]}",
        );
        let w = calibration_windows(&spec(path, 2, 3), &stories_tokenizer()).unwrap();
        assert_eq!(w.ids(), &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn jsonl_ids_errors_name_the_file_and_the_1_based_line() {
        let dir = tempfile::tempdir().unwrap();
        let ok = "{\"input_ids\": [1, 2]}\n";
        let cases: [(String, usize, usize, &str); 9] = [
            (
                format!("{ok}{{\"input_ids\": [3]}}\n"),
                1,
                2,
                "\"input_ids\" has 1 ids, expected seqlen = 2",
            ),
            (
                format!("{ok}\n{{\"input_ids\": [3, 4, 5]}}\n"),
                1,
                3,
                "has 3 ids, expected seqlen = 2",
            ),
            (
                format!("{ok}{{\"input_ids\": [3, 4]\n"),
                1,
                2,
                "not valid JSON",
            ),
            (
                format!("{ok}{{\"input_ids\": [3, -4]}}\n"),
                1,
                2,
                "input_ids[1] is -4, expected a token id",
            ),
            (
                format!("{ok}{{\"input_ids\": [3, 4.5]}}\n"),
                1,
                2,
                "input_ids[1] is 4.5",
            ),
            (
                format!("{ok}{{\"input_ids\": \"3 4\"}}\n"),
                1,
                2,
                "\"input_ids\" is a string, expected a list",
            ),
            (
                format!("{ok}{{\"text\": \"Once\"}}\n"),
                1,
                2,
                "holds a text field \"text\"",
            ),
            (
                format!("{ok}{{\"ids\": [1, 2]}}\n"),
                1,
                2,
                "no field \"input_ids\" (its fields: ids)",
            ),
            (
                format!("{ok}[1, 2]\n"),
                1,
                2,
                "expected a JSON object, found an array",
            ),
        ];
        for (text, nsamples, line, needle) in cases {
            let path = write(&dir, "ids.jsonl", text.as_bytes());
            let err =
                calibration_windows(&spec(path, nsamples, 2), &stories_tokenizer()).unwrap_err();
            assert!(
                matches!(&err, DataError::JsonlLine { line: l, .. } if *l == line),
                "{needle}: {err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("ids.jsonl, line {line}: ")) && msg.contains(needle),
                "{needle:?} in {msg}"
            );
        }
    }

    #[test]
    fn jsonl_ids_with_too_few_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "ids.jsonl", &jsonl_of(&[&[1, 2], &[3, 4]]));
        let err = calibration_windows(&spec(path, 3, 2), &stories_tokenizer()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::IdsTooFew {
                    found: 2,
                    needed: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("ids.jsonl"), "{err}");
    }

    #[test]
    fn jsonl_ids_at_or_above_the_vocab_size_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        // Line 3 (after a blank line 2) holds the second window; 512 is its token 1.
        let path = write(
            &dir,
            "ids.jsonl",
            b"{\"input_ids\": [1, 2]}\n\n{\"input_ids\": [3, 512]}\n",
        );
        let mut s = spec(path, 2, 2);
        s.vocab_size = Some(512);
        let err = calibration_windows(&s, &stories_tokenizer()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::IdOutOfVocab {
                    id: 512,
                    vocab_size: 512,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("ids.jsonl: line 3: input_ids[1] is 512"),
            "{msg}"
        );
    }

    #[test]
    fn the_first_jsonl_record_decides_between_text_and_ids() {
        let tok = stories_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        // A record with both fields is text: the text field is what a text dataset names.
        let both = write(
            &dir,
            "both.jsonl",
            b"{\"text\": \"Once upon a time there was a cat.\", \"input_ids\": [1]}\n",
        );
        let plain = write(&dir, "plain.txt", b"Once upon a time there was a cat.");
        assert_eq!(
            calibration_windows(&spec(both, 2, 4), &tok).unwrap(),
            calibration_windows(&spec(plain, 2, 4), &tok).unwrap()
        );
        // With text_field = "body", a record holding input_ids and "text" is pre-tokenized.
        let ids = write(
            &dir,
            "ids.jsonl",
            b"{\"input_ids\": [5, 6], \"text\": \"x\"}\n",
        );
        let mut s = spec(ids, 1, 2);
        s.text_field = "body".to_owned();
        assert_eq!(calibration_windows(&s, &tok).unwrap().ids(), &[5, 6]);
        // A text file with an ids record later is mixed: refused naming the line.
        let mixed = write(
            &dir,
            "mixed.jsonl",
            b"{\"text\": \"Once upon a time.\"}\n{\"input_ids\": [1, 2]}\n",
        );
        let err = calibration_windows(&spec(mixed, 1, 2), &tok).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("mixed.jsonl, line 2: ") && msg.contains("not both"),
            "{msg}"
        );
    }

    /// 100,708 ids / 256 → 393 windows: shared/reference/README.md, "Perplexity protocol".
    #[test]
    fn tinystories_eval_windows_follow_the_perplexity_protocol() {
        let text = read_text(&shared(TINYSTORIES), &TextKind::Plain).unwrap();
        let ids = stories_tokenizer().encode(&text).unwrap();
        let w = eval_windows(&ids, 256, None);
        assert_eq!(w.n(), 393);
        assert_eq!(w.window(0), &ids[..256]);
        assert_eq!(w.window(392), &ids[392 * 256..393 * 256]);
        let first = eval_windows(&ids, 256, Some(40));
        assert_eq!(first.n(), 40);
        assert_eq!(first.ids(), &ids[..40 * 256]);
    }

    #[test]
    fn eval_windows_drop_the_tail_and_cap_at_the_available_count() {
        let ids: Vec<u32> = (0..10).collect();
        let w = eval_windows(&ids, 3, Some(99));
        assert_eq!(w.n(), 3);
        assert_eq!(
            w.iter().collect::<Vec<_>>(),
            [&[0, 1, 2][..], &[3, 4, 5], &[6, 7, 8]]
        );
        assert_eq!(eval_windows(&ids, 3, Some(0)).n(), 0);
        assert_eq!(eval_windows(&ids, 11, None).n(), 0);
        assert_eq!(eval_windows(&ids, 0, None).n(), 0);
    }

    #[test]
    fn windows_new_checks_the_shape() {
        assert_eq!(Windows::new(2, vec![1, 2, 3, 4]).map(|w| w.n()), Some(2));
        assert!(Windows::new(3, vec![1, 2, 3, 4]).is_none());
        assert!(Windows::new(0, vec![1]).is_none());
        assert_eq!(Windows::new(0, Vec::new()).map(|w| w.n()), Some(0));
    }
}
