//! Resumable runs: after the stages of each block, the scheduler saves what they produced
//! (the block's *stage result*) to a checkpoint directory beside the output, so a run that
//! crashed continues with `--resume` from the first block not saved instead of block 0.
//!
//! Only the stage result is saved, not the activations: a resumed run replays each saved block
//! (restores the tensors, qparams and measured errors, then finalizes and propagates it as
//! usual), which costs a forward per block instead of the statistics and solves. Since finalization
//! and the forward are deterministic, a resumed run writes the same bytes as an uninterrupted
//! one.
//!
//! Layout of `<parent>/.<output name>.gs-checkpoint/`:
//! - `run.json`: the run's fingerprint and what it was computed from (see [`Fingerprint`]);
//! - `block-NNNNN.safetensors`: one block's stage result (see [`BlockState`]);
//! - `block-NNNNN.sha256`: the hex sha256 of that file, written after it, so a block counts as
//!   saved only when both exist and agree.
//!
//! Every file is written to a temporary name, synced, then renamed: a crash leaves either the
//! old state or the new one. The directory is removed once the output is committed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use gs_quant::{dequantize_int, quantize_int, Granularity, QParams, QuantType};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Why a checkpoint could not be used or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: an interrupted run of the same manifest, model, plugins and calibration left a checkpoint here ({done} of {blocks} blocks done); pass --resume to continue it, or delete the directory to start over", dir.display())]
    ResumeAvailable {
        dir: PathBuf,
        done: usize,
        blocks: usize,
    },
    #[error("{}: this checkpoint belongs to a different run ({what} changed); run without --resume to start over (the checkpoint is then replaced)", dir.display())]
    OtherRun { dir: PathBuf, what: String },
    #[error("{}: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
}

impl CheckpointError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io {
            action,
            path,
            source,
        }
    }
}

/// What identifies a run: a checkpoint is reused only by a run whose every part is equal.
/// Each part is a short string (mostly sha256 digests), kept by name so a mismatch can say
/// which part changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub parts: BTreeMap<String, String>,
}

impl Fingerprint {
    fn to_json(&self) -> Value {
        json!({ "version": FORMAT_VERSION, "parts": self.parts })
    }

    fn from_json(v: &Value) -> Option<Fingerprint> {
        if v.get("version")?.as_u64()? != FORMAT_VERSION {
            return None;
        }
        let parts = v
            .get("parts")?
            .as_object()?
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect::<Option<BTreeMap<_, _>>>()?;
        Some(Fingerprint { parts })
    }

    /// The names of the parts that differ between `self` and `other`.
    fn differences(&self, other: &Fingerprint) -> Vec<String> {
        let mut keys: Vec<&String> = self.parts.keys().chain(other.parts.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| self.parts.get(*k) != other.parts.get(*k))
            .cloned()
            .collect()
    }
}

/// Bumped whenever the block file layout changes: an older checkpoint is then another run's.
const FORMAT_VERSION: u64 = 1;
const RUN_FILE: &str = "run.json";

/// The checkpoint directory of one run.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    /// Blocks `0..resumable` were saved by an earlier attempt and verified.
    resumable: usize,
    /// Blocks `0..saved` are in the directory now (replayed or saved by this run).
    saved: Cell<usize>,
    /// `run.json` of a fresh checkpoint, written with the first block.
    pending_run_file: Option<Vec<u8>>,
    /// Set when a save failed: the run goes on without a checkpoint.
    disabled: Cell<bool>,
}

impl Checkpoint {
    /// Where the checkpoint of an output lives: `<parent>/.<name>.gs-checkpoint`.
    pub fn dir_for(output: &Path) -> PathBuf {
        let name = output.file_name().unwrap_or_default().to_string_lossy();
        output
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!(".{name}.gs-checkpoint"))
    }

    /// Opens the checkpoint at `dir` for a run of `blocks` blocks identified by `fingerprint`.
    ///
    /// - No checkpoint there: a new one is started (`--resume` then starts from block 0).
    /// - One of the same run: with `resume`, its verified blocks are reused; without, refused
    ///   ([`CheckpointError::ResumeAvailable`]): hours of work are never dropped silently.
    ///   (Unless every block is saved: then the run got past its last block, and likely past
    ///   its commit — the checkpoint is removed right after — so a plain run replaces it.)
    /// - One of another run: with `resume`, refused, naming what changed; without, replaced.
    pub fn open(
        dir: &Path,
        fingerprint: &Fingerprint,
        blocks: usize,
        resume: bool,
    ) -> Result<Checkpoint, CheckpointError> {
        let run_file = dir.join(RUN_FILE);
        let previous = match fs::read(&run_file) {
            Ok(bytes) => Some(
                serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .and_then(|v| Fingerprint::from_json(&v)),
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(CheckpointError::io("read", &run_file)(e)),
        };
        match previous {
            Some(Some(p)) if p == *fingerprint => {
                let mut ck = Checkpoint {
                    dir: dir.to_path_buf(),
                    resumable: 0,
                    saved: Cell::new(0),
                    pending_run_file: None,
                    disabled: Cell::new(false),
                };
                ck.resumable = ck.verified_blocks(blocks);
                ck.saved.set(ck.resumable);
                if resume {
                    tracing::info!(dir = %dir.display(), blocks = ck.resumable, "resuming: blocks saved by the interrupted run are replayed");
                    return Ok(ck);
                }
                // A checkpoint with every block saved is most likely that of a run killed
                // after its commit: not worth refusing a plain run for.
                if ck.resumable > 0 && ck.resumable < blocks {
                    return Err(CheckpointError::ResumeAvailable {
                        dir: dir.to_path_buf(),
                        done: ck.resumable,
                        blocks,
                    });
                }
            }
            Some(p) if resume => {
                let what = match p {
                    Some(p) => fingerprint.differences(&p).join(", "),
                    None => "the checkpoint format".to_string(),
                };
                return Err(CheckpointError::OtherRun {
                    dir: dir.to_path_buf(),
                    what,
                });
            }
            None if resume => {
                tracing::warn!(dir = %dir.display(), "--resume: no checkpoint of an earlier run here; starting from block 0");
            }
            _ => {}
        }
        // A fresh start: clear whatever is there. The directory is created with the first
        // saved block, so a run that fails (or is killed) before one leaves nothing behind.
        match fs::remove_dir_all(dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "replaced the checkpoint of another run")
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(CheckpointError::io("remove", dir)(e)),
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            resumable: 0,
            saved: Cell::new(0),
            pending_run_file: Some(
                serde_json::to_vec_pretty(&fingerprint.to_json()).unwrap_or_default(),
            ),
            disabled: Cell::new(false),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Blocks `0..n` are replayed from the checkpoint.
    pub fn resumable(&self) -> usize {
        self.resumable
    }

    /// Blocks `0..n` are saved (the point a `--resume` would continue from).
    pub fn saved(&self) -> usize {
        self.saved.get()
    }

    /// Deletes the checkpoint (after the output is committed).
    pub fn remove(self) -> Result<(), CheckpointError> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(CheckpointError::io("remove", &self.dir)(e))
            }
            _ => Ok(()),
        }
    }

    fn block_file(&self, block: usize) -> PathBuf {
        self.dir.join(format!("block-{block:05}.safetensors"))
    }

    fn hash_file(&self, block: usize) -> PathBuf {
        self.dir.join(format!("block-{block:05}.sha256"))
    }

    /// The number of leading blocks whose file exists and matches its recorded sha256; the
    /// first block that does not is where the run continues (later files are not trusted).
    fn verified_blocks(&self, blocks: usize) -> usize {
        for b in 0..blocks {
            let (file, hash) = (self.block_file(b), self.hash_file(b));
            let ok = match (fs::read(&file), fs::read_to_string(&hash)) {
                (Ok(bytes), Ok(h)) => hex_sha256(&bytes) == h.trim(),
                _ => false,
            };
            if !ok {
                if file.exists() {
                    tracing::warn!(file = %file.display(), "checkpoint block does not match its sha256; it and the blocks after it are recomputed");
                }
                return b;
            }
        }
        blocks
    }

    /// The saved stage result of `block`, if it is one of the verified blocks.
    pub fn load(&self, block: usize) -> Result<Option<BlockState>, CheckpointError> {
        if block >= self.resumable {
            return Ok(None);
        }
        let path = self.block_file(block);
        let bytes = fs::read(&path).map_err(CheckpointError::io("read", &path))?;
        // Verified when the checkpoint was opened; checked again in case it changed since.
        let want = fs::read_to_string(self.hash_file(block)).unwrap_or_default();
        if hex_sha256(&bytes) != want.trim() {
            return Err(CheckpointError::Corrupt {
                path,
                message: "changed while the run was using it (sha256 mismatch)".into(),
            });
        }
        BlockState::decode(&bytes)
            .map(Some)
            .map_err(|message| CheckpointError::Corrupt { path, message })
    }

    /// Saves `block`'s stage result; a failure (a full disk, say) is logged and ends
    /// checkpointing for the run rather than the run itself: the checkpoint only serves a
    /// resume, and the output's own writes report a real write problem naming the output.
    pub fn record(&self, block: usize, state: &BlockState) {
        if self.disabled.get() {
            return;
        }
        if let Err(e) = self.save(block, state) {
            self.disabled.set(true);
            let _ = fs::remove_file(self.block_file(block).with_extension("tmp"));
            if self.saved() == 0 {
                let _ = fs::remove_dir_all(&self.dir);
            }
            tracing::warn!(error = %e, "cannot save the checkpoint; the run goes on without one (it cannot be resumed past block {})", self.saved());
        }
    }

    /// Saves `block`'s stage result (file first, then its hash).
    pub fn save(&self, block: usize, state: &BlockState) -> Result<(), CheckpointError> {
        let path = self.block_file(block);
        let bytes = state.encode().map_err(|message| CheckpointError::Corrupt {
            path: path.clone(),
            message,
        })?;
        if let Some(run) = &self.pending_run_file {
            if !self.dir.join(RUN_FILE).exists() {
                fs::create_dir_all(&self.dir).map_err(CheckpointError::io("create", &self.dir))?;
                write_atomic(&self.dir.join(RUN_FILE), run)?;
            }
        }
        write_atomic(&path, &bytes)?;
        write_atomic(&self.hash_file(block), hex_sha256(&bytes).as_bytes())?;
        self.saved.set(self.saved.get().max(block + 1));
        Ok(())
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Writes `path` through a synced temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(CheckpointError::io("create", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(CheckpointError::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(CheckpointError::io("rename into place", path))
}

/// One layer's report as the stages left it.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedLayer {
    pub name: String,
    pub qparams: Option<QParams>,
    /// `(algorithm, key, value)`.
    pub metrics: Vec<(String, String, f64)>,
    /// The measured output error (saved so a replay need not run the float block).
    pub rel_output_error: Option<f64>,
}

/// A changed tensor as kept: a weight on its layer's integer grid as i8 codes (a quarter of
/// the f32 size), anything else as f32.
#[derive(Debug, Clone, PartialEq)]
enum Stored {
    F32(Vec<f32>),
    /// Codes under the qparams of the tensor's layer; dequantize to the exact f32 weights.
    Codes(Vec<i8>),
}

/// What the stages produced for one block: every tensor they changed (before the format's
/// rounding), the qparams, metrics and output error of each layer they saw, and which stages
/// changed weights.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockState {
    tensors: BTreeMap<String, Stored>,
    pub layers: Vec<SavedLayer>,
    pub modifies: Vec<bool>,
}

/// Tensor name suffixes inside a block file (`#` never occurs in a checkpoint's names).
const CODES: &str = "#codes";
const SCALES: &str = "#scales";
const ZEROS: &str = "#zeros";

/// The qparams of each layer's weight tensor (`<layer>.weight`).
fn weight_qparams(layers: &[SavedLayer]) -> BTreeMap<String, &QParams> {
    layers
        .iter()
        .filter_map(|l| Some((format!("{}.weight", l.name), l.qparams.as_ref()?)))
        .collect()
}

fn f64_hex(v: f64) -> String {
    format!("{:016x}", v.to_bits())
}

fn hex_f64(v: &Value) -> Option<f64> {
    u64::from_str_radix(v.as_str()?, 16)
        .ok()
        .map(f64::from_bits)
}

impl BlockState {
    /// The stage result of `tensors` (name, values) and `layers`; weights on their layer's
    /// grid are kept as codes right away, so holding a state costs little memory.
    pub fn capture<'t>(
        tensors: impl IntoIterator<Item = (&'t str, &'t [f32])>,
        layers: Vec<SavedLayer>,
        modifies: Vec<bool>,
    ) -> BlockState {
        let qparams = weight_qparams(&layers);
        let tensors = tensors
            .into_iter()
            .map(|(name, v)| {
                let stored = match qparams.get(name).and_then(|qp| exact_codes(v, qp)) {
                    Some(codes) => Stored::Codes(codes),
                    None => Stored::F32(v.to_vec()),
                };
                (name.to_string(), stored)
            })
            .collect();
        BlockState {
            tensors,
            layers,
            modifies,
        }
    }

    /// The changed tensors in f32, exactly as the stages left them.
    pub fn tensors(&self) -> Result<BTreeMap<String, Vec<f32>>, String> {
        let qparams = weight_qparams(&self.layers);
        self.tensors
            .iter()
            .map(|(name, stored)| {
                let values = match stored {
                    Stored::F32(v) => v.clone(),
                    Stored::Codes(codes) => {
                        let qp = qparams
                            .get(name)
                            .ok_or_else(|| format!("{name}: codes without qparams"))?;
                        dequantize_int(codes, qp).map_err(|e| format!("{name}: {e}"))?
                    }
                };
                Ok((name.clone(), values))
            })
            .collect()
    }

    /// The file bytes.
    fn encode(&self) -> Result<Vec<u8>, String> {
        let qparams = weight_qparams(&self.layers);
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, stored) in &self.tensors {
            match stored {
                Stored::Codes(codes) => {
                    let qp = qparams
                        .get(name)
                        .ok_or_else(|| format!("{name}: codes without qparams"))?;
                    let bytes = codes.iter().map(|&c| c as u8).collect();
                    owned.push((
                        format!("{name}{CODES}"),
                        Dtype::I8,
                        vec![qp.rows, qp.cols],
                        bytes,
                    ));
                }
                Stored::F32(v) => {
                    owned.push((name.clone(), Dtype::F32, vec![v.len()], f32_bytes(v)))
                }
            }
        }
        let mut layers = Vec::new();
        for l in &self.layers {
            let mut entry = json!({
                "name": l.name,
                "metrics": l.metrics.iter().map(|(a, k, v)| json!([a, k, f64_hex(*v)])).collect::<Vec<_>>(),
                "rel_output_error": l.rel_output_error.map(f64_hex),
            });
            if let Some(qp) = &l.qparams {
                entry["granularity"] = json!(granularity_text(qp.granularity));
                entry["rows"] = json!(qp.rows);
                entry["cols"] = json!(qp.cols);
                owned.push((
                    format!("{}{SCALES}", l.name),
                    Dtype::F32,
                    vec![qp.scales.len()],
                    f32_bytes(&qp.scales),
                ));
                if !qp.zeros.is_empty() {
                    let bytes = qp.zeros.iter().flat_map(|z| z.to_le_bytes()).collect();
                    owned.push((
                        format!("{}{ZEROS}", l.name),
                        Dtype::I32,
                        vec![qp.zeros.len()],
                        bytes,
                    ));
                }
            }
            layers.push(entry);
        }
        let meta = json!({ "layers": layers, "modifies": self.modifies });
        let views = owned
            .iter()
            .map(|(n, dt, shape, bytes)| {
                TensorView::new(*dt, shape.clone(), bytes)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| format!("{n}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let metadata = std::collections::HashMap::from([("state".to_string(), meta.to_string())]);
        safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
    }

    fn decode(bytes: &[u8]) -> Result<BlockState, String> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let meta: Value = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("state"))
            .ok_or("no \"state\" metadata")
            .and_then(|s| serde_json::from_str(s).map_err(|_| "\"state\" is not JSON"))?;
        let tensor = |name: &str| st.tensor(name).map_err(|e| format!("{name}: {e}"));
        let mut state = BlockState {
            modifies: meta["modifies"]
                .as_array()
                .ok_or("no \"modifies\"")?
                .iter()
                .map(|v| v.as_bool().ok_or("\"modifies\" holds a non-boolean"))
                .collect::<Result<_, _>>()?,
            ..Default::default()
        };
        for l in meta["layers"].as_array().ok_or("no \"layers\"")? {
            let name = l["name"]
                .as_str()
                .ok_or("a layer without a name")?
                .to_string();
            let metrics = l["metrics"]
                .as_array()
                .ok_or("a layer without metrics")?
                .iter()
                .map(|m| {
                    Some((
                        m[0].as_str()?.to_string(),
                        m[1].as_str()?.to_string(),
                        hex_f64(&m[2])?,
                    ))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| format!("{name}: malformed metrics"))?;
            let qparams = match l.get("granularity").and_then(Value::as_str) {
                None => None,
                Some(g) => {
                    let granularity =
                        parse_granularity(g).ok_or_else(|| format!("{name}: granularity {g}"))?;
                    let dim = |k: &str| {
                        l[k].as_u64()
                            .map(|v| v as usize)
                            .ok_or_else(|| format!("{name}: no {k}"))
                    };
                    let scales = f32_values(tensor(&format!("{name}{SCALES}"))?.data());
                    let zeros = match st.tensor(&format!("{name}{ZEROS}")) {
                        Ok(t) => t
                            .data()
                            .chunks_exact(4)
                            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                        Err(_) => Vec::new(),
                    };
                    Some(
                        QParams::new(granularity, dim("rows")?, dim("cols")?, scales, zeros)
                            .map_err(|e| format!("{name}: {e}"))?,
                    )
                }
            };
            let rel_output_error = match &l["rel_output_error"] {
                Value::Null => None,
                v => Some(hex_f64(v).ok_or_else(|| format!("{name}: malformed output error"))?),
            };
            state.layers.push(SavedLayer {
                name,
                qparams,
                metrics,
                rel_output_error,
            });
        }
        let qparams = weight_qparams(&state.layers);
        for name in st.names() {
            if name.ends_with(SCALES) || name.ends_with(ZEROS) {
                continue;
            }
            let t = tensor(name)?;
            match name.strip_suffix(CODES) {
                Some(weight) => {
                    let qp = qparams
                        .get(weight)
                        .ok_or_else(|| format!("{name}: no qparams for its layer"))?;
                    if t.data().len() != qp.rows * qp.cols {
                        return Err(format!(
                            "{name}: {} codes for a [{}, {}] layer",
                            t.data().len(),
                            qp.rows,
                            qp.cols
                        ));
                    }
                    let codes = t.data().iter().map(|&b| b as i8).collect();
                    state
                        .tensors
                        .insert(weight.to_string(), Stored::Codes(codes));
                }
                None => {
                    state
                        .tensors
                        .insert(name.to_string(), Stored::F32(f32_values(t.data())));
                }
            }
        }
        Ok(state)
    }
}

/// The i8 codes of `w` under `qp` when they dequantize back to exactly `w` (bit for bit).
fn exact_codes(w: &[f32], qp: &QParams) -> Option<Vec<i8>> {
    let args = gs_quant::QuantArgs {
        bits: 8,
        ty: QuantType::Int,
        symmetric: qp.zeros.is_empty(),
        granularity: qp.granularity,
        scale_rule: gs_quant::ScaleRule::HalfRange,
    };
    let codes = quantize_int(w, qp.rows, qp.cols, qp, &args).ok()?;
    let back = dequantize_int(&codes, qp).ok()?;
    back.iter()
        .zip(w)
        .all(|(a, b)| a.to_bits() == b.to_bits())
        .then_some(codes)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn granularity_text(g: Granularity) -> String {
    match g {
        Granularity::Tensor => "tensor".into(),
        Granularity::Channel => "channel".into(),
        Granularity::Group(n) => format!("group:{n}"),
    }
}

fn parse_granularity(s: &str) -> Option<Granularity> {
    match s {
        "tensor" => Some(Granularity::Tensor),
        "channel" => Some(Granularity::Channel),
        _ => s
            .strip_prefix("group:")?
            .parse()
            .ok()
            .map(Granularity::Group),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(model: &str) -> Fingerprint {
        Fingerprint {
            parts: BTreeMap::from([
                ("model".to_string(), model.to_string()),
                ("manifest".to_string(), "m1".to_string()),
            ]),
        }
    }

    fn state() -> BlockState {
        // A 2×4 layer on a symmetric per-channel grid: stored as codes.
        let qp = QParams::new(Granularity::Channel, 2, 4, vec![0.5, 0.25], vec![]).unwrap();
        let w = dequantize_int(&[1, -2, 3, 0, 4, -4, 2, 1], &qp).unwrap();
        // An asymmetric grouped layer whose weight is off the grid: stored as f32.
        let qp2 = QParams::new(Granularity::Group(2), 1, 4, vec![0.1, 0.2], vec![-3, 5]).unwrap();
        let tensors = [
            ("b.0.q.weight", w),
            ("b.0.k.weight", vec![0.1, 0.2, 0.3, f32::MIN_POSITIVE]),
            ("b.0.norm.weight", vec![1.5, -0.0]),
        ];
        BlockState::capture(
            tensors.iter().map(|(n, v)| (*n, v.as_slice())),
            vec![
                SavedLayer {
                    name: "b.0.q".into(),
                    qparams: Some(qp),
                    metrics: vec![("gptq".into(), "loss".into(), 0.1 + 0.2)],
                    rel_output_error: Some(0.07),
                },
                SavedLayer {
                    name: "b.0.k".into(),
                    qparams: Some(qp2),
                    metrics: vec![("x".into(), "nan".into(), f64::NAN)],
                    rel_output_error: None,
                },
                SavedLayer {
                    name: "b.0.v".into(),
                    qparams: None,
                    metrics: vec![],
                    rel_output_error: Some(f64::MIN_POSITIVE),
                },
            ],
            vec![true, false],
        )
    }

    #[test]
    fn a_block_state_round_trips_bit_for_bit_with_on_grid_weights_as_codes() {
        let s = state();
        let bytes = s.encode().unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b.0.q.weight#codes").unwrap().dtype(), Dtype::I8);
        assert_eq!(st.tensor("b.0.k.weight").unwrap().dtype(), Dtype::F32);
        let back = BlockState::decode(&bytes).unwrap();
        let (want, got) = (s.tensors().unwrap(), back.tensors().unwrap());
        assert_eq!(want.len(), 3);
        for (name, v) in &want {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(v), bits(&got[name]), "{name}");
        }
        assert_eq!(back.layers[0], s.layers[0]);
        assert_eq!(back.layers[1].qparams, s.layers[1].qparams);
        assert!(back.layers[1].metrics[0].2.is_nan());
        assert_eq!(back.layers[2], s.layers[2]);
        assert_eq!(back.modifies, s.modifies);
    }

    #[test]
    fn a_checkpoint_that_cannot_be_written_is_given_up_not_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(".out.gs-checkpoint");
        let ck = Checkpoint::open(&dir, &fingerprint("a"), 3, false).unwrap();
        // A file appears where the directory should be created.
        fs::write(&dir, b"").unwrap();
        assert!(ck.save(0, &state()).is_err());
        ck.record(0, &state());
        ck.record(1, &state());
        assert_eq!(ck.saved(), 0);
        assert!(ck.disabled.get());
    }

    #[test]
    fn a_saved_block_is_reused_only_by_the_same_run_and_only_with_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(".out.gs-checkpoint");
        let ck = Checkpoint::open(&dir, &fingerprint("a"), 3, false).unwrap();
        assert!(!dir.exists(), "created only with the first block");
        ck.save(0, &state()).unwrap();
        ck.save(1, &state()).unwrap();
        drop(ck);

        // Same run without --resume: refused, saying how far it got.
        let e = Checkpoint::open(&dir, &fingerprint("a"), 3, false).unwrap_err();
        assert!(
            e.to_string().contains("2 of 3 blocks done") && e.to_string().contains("--resume"),
            "{e}"
        );
        // Another run with --resume: refused, naming what changed.
        let e = Checkpoint::open(&dir, &fingerprint("b"), 3, true).unwrap_err();
        assert!(e.to_string().contains("(model changed)"), "{e}");

        // A corrupted block 1: only block 0 is reused.
        let f = dir.join("block-00001.safetensors");
        let mut bytes = fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&f, bytes).unwrap();
        let ck = Checkpoint::open(&dir, &fingerprint("a"), 3, true).unwrap();
        assert_eq!(ck.resumable(), 1);
        assert_eq!(
            ck.load(0).unwrap().unwrap().tensors().unwrap(),
            state().tensors().unwrap()
        );
        assert!(ck.load(1).unwrap().is_none());

        // Every block saved (a run killed after its commit): a plain run replaces it.
        ck.save(1, &state()).unwrap();
        ck.save(2, &state()).unwrap();
        drop(ck);
        let ck = Checkpoint::open(&dir, &fingerprint("a"), 3, false).unwrap();
        assert_eq!(ck.resumable(), 0);
        drop(ck);

        // Another run without --resume starts over.
        let ck = Checkpoint::open(&dir, &fingerprint("b"), 3, false).unwrap();
        assert_eq!(ck.resumable(), 0);
        assert!(!dir.join("block-00000.safetensors").exists());
        ck.remove().unwrap();
        assert!(!dir.exists());
    }
}
