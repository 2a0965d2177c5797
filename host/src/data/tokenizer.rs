//! The model's Hugging Face tokenizer (`tokenizer.json`), encoding like transformers'
//! `tok(text).input_ids`.

use std::path::{Path, PathBuf};

use super::DataError;

/// A Hugging Face fast tokenizer loaded from a `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `<model_dir>/tokenizer.json`.
    pub fn from_model_dir(model_dir: &Path) -> Result<Self, DataError> {
        Self::from_file(&model_dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                DataError::TokenizerMissing {
                    path: path.to_path_buf(),
                }
            } else {
                DataError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| DataError::TokenizerLoad {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        // transformers clears any truncation/padding stored in tokenizer.json when called
        // without `truncation=`/`padding=`; do the same so long texts are never cut.
        inner
            .with_truncation(None)
            .map_err(|e| DataError::TokenizerLoad {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        inner.with_padding(None);
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// The `tokenizer.json` this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` with the tokenizer's default special tokens (BOS for Llama-2
    /// style tokenizers, nothing for SmolLM2), as transformers' `tok(text).input_ids`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        // `encode_fast` skips offset tracking; the ids are those of `encode`.
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| DataError::Encode {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{shared, SMOL_TOKENIZER, STORIES};

    /// `(text, input_ids)` of a reference `tokens.json` (made with transformers 4.57.1 /
    /// tokenizers 0.22.2, see shared/reference/README.md, "Reference forward outputs").
    fn reference_tokens(rel: &str) -> (String, Vec<u32>) {
        let path = shared(rel);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read tokens.json"))
                .expect("parse tokens.json");
        assert_eq!(json["add_special_tokens"], serde_json::Value::Bool(true));
        let text = json["text"].as_str().expect("text").to_owned();
        let ids = json["input_ids"]
            .as_array()
            .expect("input_ids")
            .iter()
            .map(|v| u32::try_from(v.as_u64().expect("int id")).expect("u32 id"))
            .collect();
        (text, ids)
    }

    #[test]
    fn stories260k_matches_transformers_with_bos() {
        let tok = Tokenizer::from_model_dir(&shared(STORIES)).unwrap();
        let (text, expected) = reference_tokens("reference/stories260K/tokens.json");
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids.len(), 84);
        assert_eq!(ids[0], 1, "BOS <s> prepended");
        assert_eq!(ids, expected);
        assert_eq!(tok.vocab_size(), 512);
    }

    #[test]
    fn smollm2_matches_transformers_without_bos() {
        let tok = Tokenizer::from_file(&shared(SMOL_TOKENIZER)).unwrap();
        let (text, expected) = reference_tokens("reference/SmolLM2-135M-q41dq/tokens.json");
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids.len(), 44);
        assert_eq!(ids, expected);
        assert_eq!(tok.vocab_size(), 49152);
    }

    /// 100,708 ids: shared/reference/README.md, "Perplexity protocol".
    #[test]
    fn whole_tinystories_sample_has_the_reference_token_count() {
        let tok = Tokenizer::from_model_dir(&shared(STORIES)).unwrap();
        let text = std::fs::read_to_string(shared("data/tinystories/tinystories-sample.txt"))
            .expect("read tinystories sample");
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids.len(), 100_708);
        assert_eq!(ids[0], 1);
        assert_eq!(
            ids.iter().filter(|&&id| id == 1).count(),
            1,
            "one BOS at the very start"
        );
    }

    /// 303,415 ids: shared/reference/README.md, "Perplexity protocol".
    #[test]
    fn whole_wikitext2_test_has_the_reference_token_count() {
        let tok = Tokenizer::from_file(&shared(SMOL_TOKENIZER)).unwrap();
        let text = std::fs::read_to_string(shared("data/wikitext-2-raw/wiki.test.raw"))
            .expect("read wiki.test.raw");
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids.len(), 303_415);
    }

    #[test]
    fn missing_tokenizer_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_model_dir(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::TokenizerMissing { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().join("tokenizer.json").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("not found"), "{msg}");
    }

    #[test]
    fn unloadable_tokenizer_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, br#"{"version": "1.0", "model": 3}"#).unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err();
        assert!(matches!(err, DataError::TokenizerLoad { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
    }
}
