//! The `fake` export: a checkpoint laid out exactly like the source, with some tensors' values
//! replaced (e.g. by their quantize-dequantize result), loadable by any safetensors reader.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::ExportError;
use super::files::{add_extra_file, copy_source_files, source_dtype_bytes};
use super::staging::Staging;
use super::{DecodedCheckpoint, DecodedLayer, Exporter, NumberRules, QuantLayer, RUN_RECORD};
use crate::manifest::ExportFormat;
use crate::model::fakequant::{act_quant_from_json, ActQuant};
use crate::model::forward::{TensorF32, TensorSource};
use crate::model::{
    encode_header, HeaderTensor, Model, ModelConfig, ModelError, Weights, INDEX_FILE,
};

/// The fake format keeps the plugin's scales (nothing stores them) and stores the weights in
/// their source dtype, which is what a reader sees.
pub const RULES: NumberRules = NumberRules {
    scale_dtype: |_| gs_quant::ScaleDtype::F32,
    dequant_dtype: |d| match d {
        crate::model::DType::BF16 => Some(gs_quant::ScaleDtype::BF16),
        crate::model::DType::F16 => Some(gs_quant::ScaleDtype::F16),
        _ => None,
    },
};

/// Result of a finished export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The committed output directory (absolute).
    pub output: PathBuf,
    /// Shard files written.
    pub shards: usize,
    /// Tensors written in total.
    pub tensors: usize,
    /// Tensors whose values were replaced.
    pub replaced: usize,
    /// Sum of tensor bytes (the index's `total_size`).
    pub tensor_bytes: u64,
    /// Other files copied from the source, relative to the output.
    pub copied_files: Vec<PathBuf>,
    /// Files added with [`FakeQuantExport::add_file`], relative to the output.
    pub added_files: Vec<PathBuf>,
}

/// Where a shard goes in the staging directory.
#[derive(Debug)]
struct ShardPlan {
    path: PathBuf,
    /// Offset of the data section in the output file (the header may differ in length from
    /// the source's when `__metadata__` gains a `format`).
    data_start: u64,
}

/// Writes a fake-quantized copy of a model: same tensor names, dtypes, shapes, shard files and
/// index as the source, with the values of [`replace`](FakeQuantExport::replace)d tensors
/// converted to each tensor's source dtype, and every other tensor copied byte for byte.
///
/// Memory stays bounded by one tensor: `begin` lays out every output shard at its final size
/// (header written, data section sparse) in a staging directory, `replace` writes a tensor's
/// converted bytes straight to its final offset, and `finish` fills in the untouched tensors
/// from the source's memory map. Nothing appears at the output path until `finish` commits;
/// dropping the export discards everything.
#[derive(Debug)]
pub struct FakeQuantExport<'m> {
    model: &'m Model,
    staging: Staging,
    shards: Vec<ShardPlan>,
    replaced: BTreeSet<String>,
    added: BTreeSet<PathBuf>,
}

impl<'m> FakeQuantExport<'m> {
    /// Starts an export of `model` to `output` (see [`Staging::begin`] for what is refused and
    /// what `force` allows) and lays out the output shards.
    pub fn begin(model: &'m Model, output: &Path, force: bool) -> Result<Self, ExportError> {
        let staging = Staging::begin(output, &model.dir, force)?;
        let mut shards = Vec::with_capacity(model.weights.shards().len());
        for shard in model.weights.shards() {
            let header = shard.header();
            let has_format = header.metadata.iter().any(|(k, _)| k == "format");
            // transformers refuses safetensors files without `format`; keep the source's header
            // verbatim when it has one, so an untouched shard comes out byte-identical.
            let header_bytes = if has_format {
                shard.header_bytes().to_vec()
            } else {
                let mut metadata = header.metadata.clone();
                metadata.push(("format".to_string(), "pt".to_string()));
                let tensors: Vec<HeaderTensor> = header.tensors.clone();
                encode_header(&metadata, &tensors)
            };
            let data_len = (shard.file_len() - header.data_start()) as u64;
            let path = staging.path().join(shard.file_name());
            let mut file = File::create(&path).map_err(ExportError::io("create", &path))?;
            file.write_all(&header_bytes)
                .map_err(ExportError::io("write", &path))?;
            file.set_len(header_bytes.len() as u64 + data_len)
                .map_err(ExportError::io("allocate the data of", &path))?;
            shards.push(ShardPlan {
                path,
                data_start: header_bytes.len() as u64,
            });
        }
        tracing::info!(
            source = %model.dir.display(),
            output = %staging.output().display(),
            shards = shards.len(),
            "fake-quant export started"
        );
        Ok(FakeQuantExport {
            model,
            staging,
            shards,
            replaced: BTreeSet::new(),
            added: BTreeSet::new(),
        })
    }

    /// The final output path.
    pub fn output(&self) -> &Path {
        self.staging.output()
    }

    /// Sets the values of tensor `name` (row-major, `shape` of the source tensor), stored in
    /// the source dtype (BF16/F16 rounded to nearest even).
    ///
    /// Errors: unknown tensor, `values.len()` different from the element count, a source dtype
    /// other than BF16/F16/F32, a tensor already replaced, or an I/O error.
    pub fn replace(&mut self, name: &str, values: &[f32]) -> Result<(), ExportError> {
        if self.replaced.contains(name) {
            return Err(ExportError::AlreadyReplaced {
                tensor: name.to_string(),
            });
        }
        let (info, bytes) = source_dtype_bytes(self.model, name, values)?;
        let plan = &self.shards[info.shard_index()];
        let offset = plan.data_start + info.data_offsets().0 as u64;
        let mut file = OpenOptions::new()
            .write(true)
            .open(&plan.path)
            .map_err(ExportError::io("open", &plan.path))?;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(&bytes))
            .map_err(ExportError::io("write", &plan.path))?;
        self.replaced.insert(name.to_string());
        tracing::debug!(tensor = name, dtype = %info.dtype(), bytes = bytes.len(), "tensor replaced");
        Ok(())
    }

    /// Whether `name` has been replaced.
    pub fn is_replaced(&self, name: &str) -> bool {
        self.replaced.contains(name)
    }

    /// Writes an extra file into the output (see [`add_extra_file`]).
    pub fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        add_extra_file(self.staging.path(), &mut self.added, name, bytes)
    }

    /// Completes the output: copies the tensors that were not replaced, writes the index (if
    /// the source is sharded, with `metadata.total_size` recomputed), copies every other file
    /// of the source directory (recursively; not the shards, the index, other `*.safetensors`
    /// files at the top level, or `.git`), checks the result opens with the source's layout,
    /// and commits it to the output path.
    pub fn finish(self) -> Result<ExportSummary, ExportError> {
        let weights = &self.model.weights;
        for (shard, plan) in weights.shards().iter().zip(&self.shards) {
            self.fill_shard(shard, plan)?;
        }
        if weights.is_sharded() {
            self.write_index(weights)?;
        }
        let copied = copy_source_files(self.model, self.staging.path(), &self.added)?;
        self.verify()?;

        let replaced = self.replaced.len();
        let added_files: Vec<PathBuf> = self.added.iter().cloned().collect();
        let shards = self.shards.len();
        let output = self.staging.commit()?;
        tracing::info!(
            output = %output.display(),
            tensors = weights.len(),
            replaced,
            copied_files = copied.len(),
            "fake-quant export finished"
        );
        Ok(ExportSummary {
            output,
            shards,
            tensors: weights.len(),
            replaced,
            tensor_bytes: weights.total_bytes(),
            copied_files: copied,
            added_files,
        })
    }

    /// Writes the source bytes of every non-replaced tensor of one shard.
    fn fill_shard(&self, shard: &crate::model::Shard, plan: &ShardPlan) -> Result<(), ExportError> {
        let file = OpenOptions::new()
            .write(true)
            .open(&plan.path)
            .map_err(ExportError::io("open", &plan.path))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        // Position of `out`, to seek only across replaced tensors.
        let mut pos: Option<u64> = None;
        for name in shard.tensor_names() {
            if self.replaced.contains(name) {
                continue;
            }
            let info = self.model.weights.info(name)?;
            let offset = plan.data_start + info.data_offsets().0 as u64;
            if pos != Some(offset) {
                out.seek(SeekFrom::Start(offset))
                    .map_err(ExportError::io("seek in", &plan.path))?;
            }
            let bytes = self.model.weights.raw_bytes(name)?;
            out.write_all(bytes)
                .map_err(ExportError::io("write", &plan.path))?;
            pos = Some(offset + bytes.len() as u64);
            // Copied: drop the source pages so peak RSS does not grow with the model.
            self.model.weights.release(name)?;
        }
        out.flush().map_err(ExportError::io("write", &plan.path))?;
        Ok(())
    }

    fn write_index(&self, weights: &Weights) -> Result<(), ExportError> {
        let mut metadata = weights.index_metadata().cloned().unwrap_or_default();
        metadata.insert("total_size".to_string(), Value::from(weights.total_bytes()));
        let mut weight_map = Map::new();
        for (name, info) in weights.iter() {
            let shard = weights.shards()[info.shard_index()].file_name();
            weight_map.insert(name.to_string(), Value::from(shard));
        }
        let mut root = Map::new();
        root.insert("metadata".to_string(), Value::Object(metadata));
        root.insert("weight_map".to_string(), Value::Object(weight_map));
        let mut text = serde_json::to_string_pretty(&Value::Object(root))
            .map_err(|e| ExportError::Verification(format!("cannot serialize the index: {e}")))?;
        text.push('\n');
        let path = self.staging.path().join(INDEX_FILE);
        fs::write(&path, text).map_err(ExportError::io("write", &path))
    }

    /// Re-opens the staged weights and checks names, dtypes, shapes and shard files match the
    /// source (headers only; cheap).
    fn verify(&self) -> Result<(), ExportError> {
        let src = &self.model.weights;
        let out = Weights::open(self.staging.path())
            .map_err(|e| ExportError::Verification(e.to_string()))?;
        if out.len() != src.len() || out.is_sharded() != src.is_sharded() {
            return Err(ExportError::Verification(format!(
                "{} tensors written, the source has {}",
                out.len(),
                src.len()
            )));
        }
        for ((name, a), (out_name, b)) in src.iter().zip(out.iter()) {
            let same_shard = src.shards()[a.shard_index()].file_name()
                == out.shards()[b.shard_index()].file_name();
            if name != out_name
                || a.dtype() != b.dtype()
                || a.shape() != b.shape()
                || a.data_offsets() != b.data_offsets()
                || !same_shard
            {
                return Err(ExportError::Verification(format!(
                    "tensor \"{name}\" differs from the source in the written output"
                )));
            }
        }
        Ok(())
    }
}

/// Copies file contents only: permissions are not carried over (a read-only source file
/// should not make the output read-only).
impl Exporter for FakeQuantExport<'_> {
    fn output(&self) -> &Path {
        FakeQuantExport::output(self)
    }

    fn tensor(&mut self, name: &str, values: &[f32]) -> Result<(), ExportError> {
        self.replace(name, values)
    }

    fn layer(&mut self, layer: &QuantLayer) -> Result<(), ExportError> {
        self.replace(&format!("{}.weight", layer.name), &layer.dequantized)?;
        if let Some((bias, _)) = &layer.bias {
            self.replace(&format!("{}.bias", layer.name), bias)?;
        }
        Ok(())
    }

    fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        FakeQuantExport::add_file(self, name, bytes)
    }

    fn finish(self: Box<Self>) -> Result<ExportSummary, ExportError> {
        FakeQuantExport::finish(*self)
    }
}

/// A float or `fake` checkpoint opened for evaluation: the weights as stored, and the input
/// quantizers the run record lists (a fake checkpoint stores activation scales nowhere else).
#[derive(Debug)]
pub struct FakeCheckpoint {
    model: Model,
    inputs: BTreeMap<String, ActQuant>,
}

impl FakeCheckpoint {
    /// Opens `dir` as a model; reads `gs-run.json` if present.
    pub fn open(dir: &Path) -> Result<FakeCheckpoint, ExportError> {
        let model = Model::open(dir)?;
        let record = dir.join(RUN_RECORD);
        let mut inputs = BTreeMap::new();
        if record.is_file() {
            let bad = |reason: String| ExportError::BadCheckpoint {
                file: record.clone(),
                reason,
            };
            let text = fs::read(&record).map_err(ExportError::io("read", &record))?;
            let doc: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
            for layer in doc["layers"].as_array().into_iter().flatten() {
                let (Some(name), Some(input)) = (layer["name"].as_str(), layer.get("input")) else {
                    continue;
                };
                if input.is_null() {
                    continue;
                }
                let a = act_quant_from_json(input)
                    .map_err(|e| bad(format!("layers[{name}].input: {e}")))?;
                inputs.insert(name.to_string(), a);
            }
        }
        Ok(FakeCheckpoint { model, inputs })
    }
}

impl TensorSource for FakeCheckpoint {
    fn tensor_f32(&self, name: &str) -> Result<Option<TensorF32<'_>>, ModelError> {
        self.model.weights.tensor_f32(name)
    }

    fn dir(&self) -> PathBuf {
        self.model.dir.clone()
    }

    fn release_prefix(&self, prefix: &str) {
        self.model.weights.release_prefix(prefix);
    }
}

impl DecodedCheckpoint for FakeCheckpoint {
    fn format(&self) -> ExportFormat {
        ExportFormat::Fake
    }

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn quantized_layers(&self) -> Vec<String> {
        Vec::new()
    }

    fn decode_layer(&self, name: &str) -> Result<DecodedLayer, ExportError> {
        Err(ExportError::BadCheckpoint {
            file: self.model.dir.clone(),
            reason: format!("{name}: a fake checkpoint stores dequantized weights, not codes"),
        })
    }

    fn input_quant(&self, layer: &str) -> Result<Option<ActQuant>, ExportError> {
        Ok(self.inputs.get(layer).copied())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::testutil::{digests, source, values, write_model, Spec, STORIES};
    use crate::model::{DType, ModelConfig};

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn bf16_round(v: &[f32]) -> Vec<f32> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    }

    #[test]
    fn round_trip_two_shard_bf16() {
        let spec = Spec::two_shards_bf16().with_raw(
            "model.step",
            DType::I64,
            &[1],
            7i64.to_le_bytes().to_vec(),
            1,
        );
        let (root, src) = source(&spec);
        let before = digests(&src);
        let model = Model::open(&src).unwrap();
        let out = root.path().join("out/fake");

        let replaced = [
            "model.layers.0.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
            "model.layers.1.mlp.down_proj.weight",
        ];
        let mut export = FakeQuantExport::begin(&model, &out, false).unwrap();
        let mut expected = BTreeMap::new();
        for (i, name) in replaced.iter().enumerate() {
            let n = model.weights.info(name).unwrap().numel();
            // Values that need rounding to bf16.
            let v: Vec<f32> = values(n, 100 + i)
                .iter()
                .map(|x| x * 1.2345 + 1e-4)
                .collect();
            export.replace(name, &v).unwrap();
            expected.insert(name.to_string(), bf16_round(&v));
        }
        assert!(export.is_replaced(replaced[0]));
        export
            .add_file("gs-provenance.json", b"{\"method\":\"rtn\"}")
            .unwrap();
        assert!(!out.exists(), "nothing at the output before finish");
        let summary = export.finish().unwrap();

        assert_eq!(summary.output, out);
        assert_eq!(
            (summary.shards, summary.tensors, summary.replaced),
            (2, spec.tensors.len(), 3)
        );
        assert_eq!(summary.added_files, [PathBuf::from("gs-provenance.json")]);
        let copied: BTreeSet<PathBuf> = summary.copied_files.iter().cloned().collect();
        for f in [
            "config.json",
            "tokenizer.json",
            "generation_config.json",
            "LICENSE",
            "original/params.json",
        ] {
            assert!(copied.contains(Path::new(f)), "{f} not copied: {copied:?}");
            assert_eq!(
                fs::read(out.join(f)).unwrap(),
                fs::read(src.join(f)).unwrap(),
                "{f}"
            );
        }
        assert_eq!(copied.len(), 5);

        let w = Weights::open(&out).unwrap();
        assert!(w.is_sharded());
        for t in &spec.tensors {
            let info = w.info(&t.name).unwrap();
            assert_eq!((info.dtype(), info.shape()), (t.dtype, &t.shape[..]));
            assert_eq!(
                w.shards()[info.shard_index()].file_name(),
                spec.shard_names[t.shard]
            );
            match expected.get(&t.name) {
                Some(v) => assert_eq!(&w.to_f32(&t.name).unwrap(), v, "{}", t.name),
                None => assert_eq!(w.raw_bytes(&t.name).unwrap(), &t.bytes[..], "{}", t.name),
            }
        }
        // Source headers had `format`, so they are kept verbatim.
        for (a, b) in model.weights.shards().iter().zip(w.shards()) {
            assert_eq!(a.header_bytes(), b.header_bytes());
        }

        let src_index: Value =
            serde_json::from_slice(&fs::read(src.join(INDEX_FILE)).unwrap()).unwrap();
        let out_index: Value =
            serde_json::from_slice(&fs::read(out.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(out_index["weight_map"], src_index["weight_map"]);
        let total: usize = spec.tensors.iter().map(|t| t.bytes.len()).sum();
        assert_eq!(out_index["metadata"]["total_size"], Value::from(total));
        assert_eq!(
            out_index["metadata"]["total_parameters"],
            src_index["metadata"]["total_parameters"]
        );
        assert_eq!(
            fs::read(out.join("gs-provenance.json")).unwrap(),
            b"{\"method\":\"rtn\"}"
        );

        assert_eq!(digests(&src), before, "source directory changed");
        assert_eq!(
            entries(&root.path().join("out")),
            ["fake"],
            "staging left behind"
        );
    }

    #[test]
    fn export_without_replacements_is_byte_identical() {
        let spec = Spec::two_shards_bf16();
        let (root, src) = source(&spec);
        let model = Model::open(&src).unwrap();
        let out = root.path().join("copy");
        FakeQuantExport::begin(&model, &out, false)
            .unwrap()
            .finish()
            .unwrap();
        let (a, b) = (digests(&src), digests(&out));
        for name in &spec.shard_names {
            assert_eq!(a[Path::new(name)], b[Path::new(name)], "{name}");
        }
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    }

    #[test]
    fn header_without_format_gains_it_and_keeps_metadata() {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("src");
        fs::create_dir(&src).unwrap();
        let mut spec = Spec::llama(DType::F16, 1);
        spec.extra_files.clear();
        write_model(&src, &spec);
        // Rewrite the shard with metadata lacking "format".
        let w = Weights::open(&src).unwrap();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = w
            .iter()
            .map(|(n, i)| {
                let view = safetensors::tensor::TensorView::new(
                    i.dtype().to_safetensors(),
                    i.shape().to_vec(),
                    w.raw_bytes(n).unwrap(),
                )
                .unwrap();
                (n.to_string(), view)
            })
            .collect();
        let tmp = src.join("model.tmp");
        let meta = std::collections::HashMap::from([("source".to_string(), "test".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &tmp).unwrap();
        drop(w);
        fs::rename(&tmp, src.join("model.safetensors")).unwrap();

        let model = Model::open(&src).unwrap();
        assert_eq!(
            model.weights.shards()[0].metadata(),
            [("source".to_string(), "test".to_string())]
        );
        let out = root.path().join("out");
        let mut export = FakeQuantExport::begin(&model, &out, false).unwrap();
        let name = "model.layers.1.mlp.up_proj.weight";
        let v = vec![0.1f32; 128];
        export.replace(name, &v).unwrap();
        export.finish().unwrap();

        let w = Weights::open(&out).unwrap();
        assert!(!w.is_sharded());
        assert!(!out.join(INDEX_FILE).exists());
        let meta = w.shards()[0].metadata();
        assert!(
            meta.contains(&("source".to_string(), "test".to_string())),
            "{meta:?}"
        );
        assert!(
            meta.contains(&("format".to_string(), "pt".to_string())),
            "{meta:?}"
        );
        let f16_01 = half::f16::from_f32(0.1).to_f32();
        assert!(w.to_f32(name).unwrap().iter().all(|&x| x == f16_01));
        for t in spec.tensors.iter().filter(|t| t.name != name) {
            assert_eq!(w.raw_bytes(&t.name).unwrap(), &t.bytes[..], "{}", t.name);
        }
        // The safetensors crate reads it too.
        let bytes = fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), spec.tensors.len());
    }

    #[test]
    fn output_inside_source_is_refused() {
        let (_root, src) = source(&Spec::two_shards_bf16());
        let before = digests(&src);
        let model = Model::open(&src).unwrap();
        let err = FakeQuantExport::begin(&model, &src.join("q"), true).unwrap_err();
        assert!(
            matches!(err, ExportError::OutputInsideSource { .. }),
            "{err}"
        );
        let err = FakeQuantExport::begin(&model, &src, true).unwrap_err();
        assert!(matches!(err, ExportError::OutputIsSource { .. }), "{err}");
        assert_eq!(digests(&src), before);
    }

    #[test]
    fn existing_output_needs_force() {
        let (root, src) = source(&Spec::two_shards_bf16());
        let model = Model::open(&src).unwrap();
        let out = root.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("stale.txt"), b"old").unwrap();

        let err = FakeQuantExport::begin(&model, &out, false).unwrap_err();
        assert!(matches!(err, ExportError::OutputNotEmpty { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(out.join("stale.txt")).unwrap(), b"old");
        // --force replaces only what gs-host wrote (it holds the run record).
        let err = FakeQuantExport::begin(&model, &out, true).unwrap_err();
        assert!(matches!(err, ExportError::ForceNotOurs { .. }), "{err}");
        fs::write(out.join(crate::export::RUN_RECORD), b"{}").unwrap();

        FakeQuantExport::begin(&model, &out, true)
            .unwrap()
            .finish()
            .unwrap();
        assert!(!out.join("stale.txt").exists());
        assert!(out.join(INDEX_FILE).exists());
        assert_eq!(entries(root.path()), ["out", "src"]);
    }

    #[test]
    fn dropped_export_leaves_nothing() {
        let (root, src) = source(&Spec::two_shards_bf16());
        let model = Model::open(&src).unwrap();
        let out = root.path().join("out");
        {
            let mut export = FakeQuantExport::begin(&model, &out, false).unwrap();
            export.replace("lm_head.weight", &[0.5; 128]).unwrap();
            export.add_file("notes.txt", b"x").unwrap();
        }
        assert!(!out.exists());
        assert_eq!(entries(root.path()), ["src"]);
    }

    #[test]
    fn replace_errors_name_the_tensor() {
        let spec = Spec::two_shards_bf16().with_raw(
            "model.step",
            DType::I64,
            &[1],
            7i64.to_le_bytes().to_vec(),
            0,
        );
        let (root, src) = source(&spec);
        let model = Model::open(&src).unwrap();
        let mut export = FakeQuantExport::begin(&model, &root.path().join("out"), false).unwrap();

        let err = export
            .replace("model.layers.0.self_attn.k_proj.weight", &[0.0; 31])
            .unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::LengthMismatch {
                    expected: 32,
                    found: 31,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("\"model.layers.0.self_attn.k_proj.weight\"")
                && err.to_string().contains("[4, 8]"),
            "{err}"
        );

        let err = export
            .replace("model.layers.9.nope", &[0.0; 4])
            .unwrap_err();
        assert!(matches!(err, ExportError::UnknownTensor { .. }), "{err}");
        assert!(err.to_string().contains("\"model.layers.9.nope\""), "{err}");

        let err = export.replace("model.step", &[1.0]).unwrap_err();
        assert!(
            matches!(
                err,
                ExportError::UnsupportedDType {
                    dtype: DType::I64,
                    ..
                }
            ),
            "{err}"
        );

        export.replace("model.norm.weight", &[1.0; 8]).unwrap();
        let err = export.replace("model.norm.weight", &[2.0; 8]).unwrap_err();
        assert!(matches!(err, ExportError::AlreadyReplaced { .. }), "{err}");
        assert!(err.to_string().contains("\"model.norm.weight\""), "{err}");

        // Failed replacements leave the tensor untouched.
        let summary = export.finish().unwrap();
        assert_eq!(summary.replaced, 1);
        let w = Weights::open(&summary.output).unwrap();
        assert_eq!(w.to_f32("model.norm.weight").unwrap(), vec![1.0; 8]);
        let k = spec.tensor("model.layers.0.self_attn.k_proj.weight");
        assert_eq!(w.raw_bytes(&k.name).unwrap(), &k.bytes[..]);
        assert_eq!(w.raw_bytes("model.step").unwrap(), 7i64.to_le_bytes());
    }

    #[test]
    fn add_file_rules() {
        let (root, src) = source(&Spec::two_shards_bf16());
        let model = Model::open(&src).unwrap();
        let mut export = FakeQuantExport::begin(&model, &root.path().join("out"), false).unwrap();
        for bad in [
            "",
            "../x.json",
            "/etc/x",
            "a/../../b",
            INDEX_FILE,
            "model-00001-of-00002.safetensors",
        ] {
            let err = export.add_file(bad, b"x").unwrap_err();
            assert!(
                matches!(err, ExportError::InvalidExtraFile { .. }),
                "{bad}: {err}"
            );
        }
        export.add_file("quant/info.json", b"{}").unwrap();
        let err = export.add_file("quant/info.json", b"{}").unwrap_err();
        assert!(err.to_string().contains("already added"), "{err}");
        // An added file wins over the source's copy.
        export
            .add_file("config.json", b"{\"patched\":true}")
            .unwrap();
        export.add_file("original/params.json", b"{}").unwrap();
        let summary = export.finish().unwrap();
        let out = &summary.output;
        assert_eq!(
            fs::read(out.join("config.json")).unwrap(),
            b"{\"patched\":true}"
        );
        assert_eq!(fs::read(out.join("original/params.json")).unwrap(), b"{}");
        assert_eq!(fs::read(out.join("quant/info.json")).unwrap(), b"{}");
        assert!(!summary.copied_files.contains(&PathBuf::from("config.json")));
        assert!(summary
            .copied_files
            .contains(&PathBuf::from("tokenizer.json")));
        assert_eq!(
            fs::read(src.join("config.json")).unwrap(),
            serde_json::to_vec_pretty(&Spec::two_shards_bf16().config).unwrap()
        );
    }

    #[test]
    fn stray_safetensors_and_git_are_not_copied() {
        let (root, src) = source(&Spec::llama(DType::F32, 1));
        fs::write(
            src.join("consolidated.safetensors"),
            b"not part of the checkpoint",
        )
        .unwrap();
        fs::create_dir(src.join(".git")).unwrap();
        fs::write(src.join(".git/HEAD"), b"ref").unwrap();
        fs::create_dir(src.join("sub")).unwrap();
        fs::write(
            src.join("sub/extra.safetensors"),
            b"kept: only the top level is weights",
        )
        .unwrap();
        let model = Model::open(&src).unwrap();
        let summary = FakeQuantExport::begin(&model, &root.path().join("out"), false)
            .unwrap()
            .finish()
            .unwrap();
        let out = &summary.output;
        assert!(!out.join("consolidated.safetensors").exists());
        assert!(!out.join(".git").exists());
        assert!(out.join("sub/extra.safetensors").exists());
        assert!(out.join("model.safetensors").exists());
    }

    #[test]
    fn real_stories260k() {
        let root = tempfile::tempdir().unwrap();
        let model = Model::open(Path::new(STORIES)).unwrap();
        let before = digests(Path::new(STORIES));
        let out = root.path().join("stories-fake");
        let mut export = FakeQuantExport::begin(&model, &out, false).unwrap();
        let name = "model.layers.0.self_attn.q_proj.weight";
        let orig = model.weights.to_f32(name).unwrap();
        let rounded: Vec<f32> = orig.iter().map(|x| (x * 16.0).round() / 16.0).collect();
        export.replace(name, &rounded).unwrap();
        let summary = export.finish().unwrap();
        assert_eq!(summary.tensors, 48);
        let reopened = Model::open(&out).unwrap();
        assert_eq!(reopened.weights.to_f32(name).unwrap(), rounded);
        assert_eq!(
            reopened.weights.raw_bytes("lm_head.weight").unwrap(),
            model.weights.raw_bytes("lm_head.weight").unwrap()
        );
        assert_eq!(
            reopened.config,
            ModelConfig {
                path: out.join("config.json"),
                ..model.config.clone()
            }
        );
        for f in [
            "tokenizer.json",
            "LICENSE",
            "PROVENANCE.md",
            "generation_config.json",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
        assert_eq!(digests(Path::new(STORIES)), before);
    }
}
