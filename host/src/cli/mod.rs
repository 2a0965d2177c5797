//! The `gs-host` command line: `--manifest run.toml` runs, plus `check`, `plugins`, `inspect`,
//! `eval`.
//! Errors get their context here (anyhow); the library modules return typed errors.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Plugins,
    /// Describe a model directory: architecture, layers, tensors, parameter count.
    Inspect {
        /// Directory with config.json and safetensors weights.
        model: PathBuf,
    },
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

/// Entry point of the `gs-host` binary.
pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match commands::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
