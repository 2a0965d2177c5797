//! Errors of model loading. Every variant names the file, key or tensor at fault.

use std::path::PathBuf;

use super::dtype::DType;

/// An error opening or reading a Hugging Face checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model directory does not exist or is not a directory.
    #[error("model directory {}: {reason}", path.display())]
    BadDirectory {
        /// The path given.
        path: PathBuf,
        /// What is wrong ("does not exist", "is not a directory").
        reason: &'static str,
    },

    /// An I/O error on a file that exists (or should).
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "open", "memory-map", "list").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// `config.json` is missing.
    #[error("{}: file not found (a Hugging Face model directory needs a config.json)", path.display())]
    ConfigMissing {
        /// Where it was looked for.
        path: PathBuf,
    },

    /// A JSON file (config or index) does not parse.
    #[error("invalid JSON in {} at line {line}, column {column}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the parser expected.
        message: String,
    },

    /// A required config key is absent (or `null`).
    #[error("{}: required key \"{key}\" is missing", path.display())]
    ConfigKeyMissing {
        /// The config file.
        path: PathBuf,
        /// The key.
        key: String,
    },

    /// A config key has a value of the wrong type or range.
    #[error("\"{key}\" in {}: expected {expected}, found {found}", path.display())]
    ConfigKeyType {
        /// The config file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What was expected, e.g. "a positive integer".
        expected: &'static str,
        /// The value found, as (truncated) JSON.
        found: String,
    },

    /// Config values that are individually valid but inconsistent with each other.
    #[error("{}: {message}", path.display())]
    ConfigInconsistent {
        /// The config file.
        path: PathBuf,
        /// Which keys disagree, and how.
        message: String,
    },

    /// Neither `model.safetensors` nor `model.safetensors.index.json` is in the directory.
    #[error("no model.safetensors or model.safetensors.index.json in {}{}", dir.display(), found_hint(found))]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
        /// Other `*.safetensors` files that were found there (not loaded without an index).
        found: Vec<String>,
    },

    /// `model.safetensors.index.json` parses as JSON but is not a valid index.
    #[error("{}: {message}", path.display())]
    IndexInvalid {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// The index maps tensors to a shard file that does not exist.
    #[error("{} names shard \"{shard}\" (for {tensors} tensors, e.g. \"{example}\"), but {} does not exist", index.display(), shard_path.display())]
    ShardMissing {
        /// The index file.
        index: PathBuf,
        /// The shard file name as written in the index.
        shard: String,
        /// The path that was looked for.
        shard_path: PathBuf,
        /// How many tensors the index maps to it.
        tensors: usize,
        /// One of them.
        example: String,
    },

    /// The index maps a tensor to a shard whose header does not contain it.
    #[error("{} maps tensor \"{tensor}\" to {}, but that shard has no such tensor{}", index.display(), shard.display(), found_in.as_ref().map(|p| format!(" (it is in {})", p.display())).unwrap_or_default())]
    TensorNotInShard {
        /// The index file.
        index: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shard the index names.
        shard: PathBuf,
        /// The shard that does contain it, if any.
        found_in: Option<PathBuf>,
    },

    /// The same tensor name appears in two shard files.
    #[error("tensor \"{tensor}\" is present in two shards: {} and {}", first.display(), second.display())]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// One shard file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },

    /// A shard's header is unreadable, truncated, or describes offsets outside the file.
    #[error("invalid safetensors file {}: {message}", path.display())]
    ShardHeader {
        /// The shard file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A tensor's dtype and shape disagree with the byte range its header entry gives.
    #[error("invalid safetensors file {}: tensor \"{tensor}\" has dtype {dtype} and shape {shape:?}, which is {expected} bytes, but its data_offsets span {actual} bytes", path.display(), expected = expected.map_or_else(|| "not a whole number of".to_string(), |n| n.to_string()))]
    TensorSize {
        /// The shard file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes implied by dtype and shape (`None`: overflow or a fractional byte count).
        expected: Option<usize>,
        /// Bytes between its data offsets.
        actual: usize,
    },

    /// A floating-point tensor holds NaN or ±infinity (source weights must be finite: the
    /// host refuses non-finite results from plugins, so such a weight could never be
    /// quantized, and copied through it would poison every forward pass).
    #[error("tensor \"{tensor}\" in {} holds {value} at index {index}{position}; gs-host quantizes only finite weights: repair or re-export the checkpoint", path.display())]
    NonFinite {
        /// The tensor.
        tensor: String,
        /// Its shard file.
        path: PathBuf,
        /// Flat (row-major) index of the first non-finite value.
        index: usize,
        /// That value (NaN, inf or -inf).
        value: f32,
        /// `" (row r, column c)"` for a matrix, empty otherwise.
        position: String,
    },

    /// No tensor of that name in the checkpoint.
    #[error("no tensor named \"{name}\" in the model at {}", dir.display())]
    UnknownTensor {
        /// The name asked for.
        name: String,
        /// The model directory.
        dir: PathBuf,
    },

    /// Conversion to `f32` asked for a dtype that does not support it.
    #[error("tensor \"{tensor}\" has dtype {dtype}, which cannot be converted to f32 (supported: BF16, F16, F32)")]
    UnsupportedDType {
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
    },
}

fn found_hint(found: &[String]) -> String {
    if found.is_empty() {
        String::new()
    } else {
        format!(
            " (found {}; a sharded checkpoint needs its index file)",
            found.join(", ")
        )
    }
}

/// Turns a serde_json error into [`ModelError::Json`] for `path`.
pub(crate) fn json_error(path: &std::path::Path, err: &serde_json::Error) -> ModelError {
    let text = err.to_string();
    // serde_json appends " at line L column C"; the variant reports those separately.
    let message = match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    ModelError::Json {
        path: path.to_path_buf(),
        line: err.line(),
        column: err.column(),
        message,
    }
}
