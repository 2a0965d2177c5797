//! The `gs-host` command line: `--manifest run.toml` runs, plus `quantize` (a preset expanded
//! to a manifest), `check`, `plugins`, `inspect`, `eval`, `devices`.
//! Errors get their context here (anyhow); the library modules return typed errors.

mod commands;
mod devices;
pub mod presets;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::manifest::{DeviceKind, ExportFormat};

/// Post-training quantization of large language models through algorithm plugins.
#[derive(Debug, Parser)]
#[command(name = "gs-host", version, about, propagate_version = true)]
pub struct Cli {
    /// Run manifest (TOML); see docs/manifest.md. Without a subcommand, runs it.
    #[arg(long, global = true, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Extra plugin directory (repeatable); also `GS_PLUGIN_PATH` (`:`-separated).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Replace an existing, non-empty output directory.
    #[arg(long, global = true)]
    pub force: bool,
    /// Continue an interrupted run of the same manifest from the blocks it finished (saved in
    /// `.<output name>.gs-checkpoint` beside the output).
    #[arg(long, global = true)]
    pub resume: bool,
    /// Compute device: `cpu`, or `ascend:ID[,ID…]` (Ascend NPUs as `gs-host devices` numbers
    /// them; with several, the calibration samples of each block are split across them).
    /// Overrides the manifest's [device]; without either, the CPU.
    #[arg(long, global = true, value_name = "DEVICE", value_parser = parse_device)]
    pub device: Option<DeviceFlag>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the manifest's pipeline and write its output (same as giving only --manifest).
    Run,
    /// Validate the manifest, plugins, parameters and model without running anything.
    Check,
    /// List the plugins found: name, version, vendor, ABI, algorithms, path, sha256.
    Plugins {
        /// Check instead of listing: each library's ABI, the manifest's sha256 pins and that
        /// every pipeline algorithm is provided, one verdict per plugin; no algorithm is
        /// created or run. Exits non-zero when any check fails.
        #[arg(long)]
        verify: bool,
    },
    /// List the compute devices: the CPU (cores, SIMD features) and, when an AscendCL runtime
    /// loads, each Ascend NPU (SoC, memory, CANN version); otherwise why none was found.
    Devices,
    /// Describe a model directory: architecture, layers, tensors, parameter count.
    Inspect {
        /// Directory with config.json and safetensors weights.
        model: PathBuf,
    },
    /// Quantize a model with a preset: a one-line form of a manifest, which --print-manifest
    /// shows (save it and run it with --manifest to take full control).
    Quantize(QuantizeArgs),
    /// Perplexity of a model or of a checkpoint gs-host wrote (compressed-tensors, ascend and
    /// fake checkpoints are decoded, with their activation quantization simulated).
    Eval {
        /// Model or checkpoint directory.
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Text file, evaluated as is (tokenized once with the tokenizer's default special tokens).
        #[arg(long, value_name = "FILE")]
        data: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        seqlen: usize,
        /// Evaluate only the first K windows (default: all full windows).
        #[arg(long, value_name = "K")]
        windows: Option<usize>,
    },
}

/// `gs-host quantize`. Calibration options default to the manifest's (docs/manifest.md).
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Model directory (config.json, safetensors weights, tokenizer.json).
    #[arg(value_name = "MODEL DIR")]
    pub model: PathBuf,
    /// What to run; each preset expands to a full manifest (see --print-manifest).
    #[arg(long, value_name = "NAME", value_parser = preset_values())]
    pub preset: String,
    /// Output directory: must not exist or be empty (--force replaces an earlier gs-host output).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Checkpoint format.
    #[arg(long, value_enum, default_value_t = FormatArg::CompressedTensors)]
    pub format: FormatArg,
    /// Calibration data: a text file, a .jsonl file of {"text": ...} records, or pre-tokenized
    /// windows (.json {"input_ids": [[...], ...]}, or .jsonl with one {"input_ids": [...]} per
    /// line). Required by calibrated presets; with a data-free one it measures each layer's
    /// output error.
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration windows [default: 128].
    #[arg(long, value_name = "N", requires = "calib", value_parser = clap::value_parser!(u32).range(1..))]
    pub nsamples: Option<u32>,
    /// Tokens per calibration window [default: 512].
    #[arg(long, value_name = "L", requires = "calib", value_parser = clap::value_parser!(u32).range(1..))]
    pub seqlen: Option<u32>,
    /// Seed for drawing windows from a text [default: 0] (pre-tokenized windows are used in order).
    #[arg(long, value_name = "S", requires = "calib", value_parser = clap::value_parser!(u64).range(..=i64::MAX as u64))]
    pub seed: Option<u64>,
    /// Input columns per weight group (presets with per-group weights only; default 128).
    #[arg(long, value_name = "G", value_parser = clap::value_parser!(u32).range(1..))]
    pub group_size: Option<u32>,
    /// Print the manifest the command would run, and run nothing.
    #[arg(long)]
    pub print_manifest: bool,
}

/// `--format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// vLLM, SGLang, transformers.
    #[value(name = "compressed-tensors")]
    CompressedTensors,
    /// msModelSlim AscendV1 (vLLM-Ascend, MindIE).
    Ascend,
    /// Float safetensors holding the quantize-dequantize values.
    Fake,
}

impl FormatArg {
    pub fn format(self) -> ExportFormat {
        match self {
            FormatArg::CompressedTensors => ExportFormat::CompressedTensors,
            FormatArg::Ascend => ExportFormat::Ascend,
            FormatArg::Fake => ExportFormat::Fake,
        }
    }
}

/// `--device`: a device kind and, for NPUs, their ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFlag {
    pub kind: DeviceKind,
    /// Distinct NPU ids in the order given; empty for the CPU.
    pub ids: Vec<u32>,
}

/// `cpu`, `ascend` (NPU 0) or `ascend:0,1`.
fn parse_device(s: &str) -> Result<DeviceFlag, String> {
    let (kind, ids) = match s.split_once(':') {
        Some((k, ids)) => (k, Some(ids)),
        None => (s, None),
    };
    match (kind, ids) {
        ("cpu", None) => Ok(DeviceFlag {
            kind: DeviceKind::Cpu,
            ids: Vec::new(),
        }),
        ("ascend", None) => Ok(DeviceFlag {
            kind: DeviceKind::Ascend,
            ids: vec![0],
        }),
        ("ascend", Some(list)) => {
            let mut ids = Vec::new();
            for part in list.split(',') {
                let id: u32 = part.trim().parse().map_err(|_| {
                    format!("`{part}` is not an NPU id (expected e.g. ascend:0 or ascend:0,1)")
                })?;
                if ids.contains(&id) {
                    return Err(format!("NPU {id} is listed twice"));
                }
                ids.push(id);
            }
            Ok(DeviceFlag {
                kind: DeviceKind::Ascend,
                ids,
            })
        }
        _ => Err("expected `cpu`, `ascend` or `ascend:ID[,ID…]` (e.g. ascend:0,1)".into()),
    }
}

/// The preset names with their one-line summaries (listed by `--help` and by clap's error for
/// an unknown name).
fn preset_values() -> PossibleValuesParser {
    PossibleValuesParser::new(presets::names().map(|name| {
        let summary = presets::find(name)
            .map(|p| p.summary().to_owned())
            .unwrap_or_default();
        PossibleValue::new(name).help(summary)
    }))
}

/// Entry point of the `gs-host` binary.
pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The command line `args` (the first is the program name) run in this process, as the binary
/// runs them, without installing a log subscriber: the library entry point of everything the
/// CLI does (a long-running service, or tests that run many pipelines in one process).
pub fn run_args<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    commands::dispatch(Cli::try_parse_from(args)?)
}

/// The error and its causes joined with `": "` (anyhow's `{:#}`), except a cause whose text
/// the message before it already ends with: many library errors quote their I/O source
/// (`cannot read X: No such file…`) and also expose it as the source.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.ends_with(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

fn init_tracing() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::{parse_device, render_error, DeviceFlag};
    use crate::manifest::DeviceKind;

    #[test]
    fn device_flags_parse_and_bad_ones_say_what_is_expected() {
        let ascend = |ids: &[u32]| DeviceFlag {
            kind: DeviceKind::Ascend,
            ids: ids.to_vec(),
        };
        assert_eq!(parse_device("cpu").unwrap().kind, DeviceKind::Cpu);
        assert_eq!(parse_device("ascend").unwrap(), ascend(&[0]));
        assert_eq!(parse_device("ascend:1,0").unwrap(), ascend(&[1, 0]));
        assert_eq!(
            parse_device("ascend:0,0").unwrap_err(),
            "NPU 0 is listed twice"
        );
        assert!(parse_device("ascend:x")
            .unwrap_err()
            .contains("`x` is not an NPU id"));
        assert!(parse_device("gpu:0")
            .unwrap_err()
            .starts_with("expected `cpu`"));
        assert!(parse_device("cpu:0")
            .unwrap_err()
            .starts_with("expected `cpu`"));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x.txt: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_quoted_by_its_error_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Quoting { source: io }).context("[calibration]");
        assert_eq!(
            render_error(&e),
            "[calibration]: cannot read x.txt: no such file"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render_error(&e), "outer: inner");
    }
}
