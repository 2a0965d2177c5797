//! What each subcommand does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{Cli, Command};
use crate::arch::{self, Family};
use crate::data::{calibration_windows, CalibrationSpec, Tokenizer, Windows};
use crate::device::CpuDevice;
use crate::export::{FakeQuantExport, RUN_RECORD};
use crate::manifest::Manifest;
use crate::model::Model;
use crate::plugins::{AlgorithmInstance, Pin, PluginRegistry, SearchPath};
use crate::scheduler::{self, Calibration, RunSummary};

pub fn dispatch(cli: Cli) -> Result<()> {
    match (&cli.command, &cli.manifest) {
        (Some(Command::Inspect { model }), _) => inspect(model),
        (Some(Command::Plugins), m) => plugins(m.as_deref(), &cli.plugin_dirs),
        (Some(Command::Check), Some(m)) => check(m, &cli.plugin_dirs).map(|_| ()),
        (Some(Command::Run) | None, Some(m)) => run(m, &cli.plugin_dirs, cli.force),
        (Some(Command::Check | Command::Run), None) => {
            bail!("--manifest FILE is required (see docs/manifest.md)")
        }
        (None, None) => bail!(
            "nothing to do: give --manifest FILE to run a pipeline, or a subcommand (see --help)"
        ),
    }
}

fn inspect(dir: &Path) -> Result<()> {
    let model = Model::open(dir).with_context(|| format!("cannot open model {}", dir.display()))?;
    print!("{}", model.summary());
    Ok(())
}

fn registry(manifest: Option<&Manifest>, dirs: &[PathBuf]) -> Result<PluginRegistry> {
    let manifest_dir = manifest.and_then(|m| m.path.parent()).map(|d| {
        if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        }
    });
    let env = std::env::var_os("GS_PLUGIN_PATH");
    let search = SearchPath::standard(manifest_dir, dirs, env.as_deref(), true);
    let pins = manifest
        .map(|m| {
            m.plugins
                .iter()
                .map(|(k, p)| {
                    (
                        k.clone(),
                        Pin {
                            sha256: p.sha256.clone(),
                            path: p.path.clone(),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(PluginRegistry::load(&search, &pins)?)
}

fn plugins(manifest: Option<&Path>, dirs: &[PathBuf]) -> Result<()> {
    let m = manifest.map(Manifest::load).transpose()?;
    let reg = registry(m.as_ref(), dirs)?;
    if reg.plugins().is_empty() {
        println!("no plugins found (searched plugins/ beside the manifest, --plugin-dir, GS_PLUGIN_PATH and the built-in directory)");
        return Ok(());
    }
    for p in reg.plugins() {
        println!("{} {} ({})", p.name, p.version, p.vendor);
        println!(
            "  abi:        {} (gs-plugin-api {})",
            p.abi_major, p.api_version
        );
        for (name, summary) in &p.algorithms {
            let active = reg
                .provider(name)
                .is_some_and(|q| std::sync::Arc::ptr_eq(q, p));
            let note = if active { "" } else { " [shadowed]" };
            println!("  algorithm:  {name}: {summary}{note}");
        }
        println!("  path:       {} ({})", p.path.display(), p.source.label());
        println!("  sha256:     {}", p.sha256);
    }
    Ok(())
}

/// Everything a run needs, validated; nothing written yet.
struct Prepared {
    manifest: Manifest,
    model: Model,
    family: Family,
    stages: Vec<AlgorithmInstance>,
    /// Calibration windows, when the manifest has `[calibration]`.
    windows: Option<Windows>,
}

fn check(path: &Path, dirs: &[PathBuf]) -> Result<Prepared> {
    let manifest = Manifest::load(path)?;
    let mpath = manifest.path.display().to_string();
    if manifest.eval.is_some() {
        bail!("{mpath}: [eval] is not supported by this gs-host version yet (perplexity evaluation is planned); remove the section");
    }
    let reg = registry(Some(&manifest), dirs)?;
    let mut stages = Vec::new();
    for stage in &manifest.pipeline {
        let inst = reg
            .create(&stage.algorithm, &stage.params_text())
            .with_context(|| format!("{}: [[pipeline]] stage", stage.at))?;
        if !inst.required.is_empty() && manifest.calibration.is_none() {
            let kinds: Vec<_> = inst.required.kinds().map(|k| k.name()).collect();
            bail!(
                "{}: algorithm `{}` needs calibration statistics ({}); add a [calibration] section with a dataset (see docs/manifest.md)",
                stage.at,
                inst.name,
                kinds.join(", ")
            );
        }
        stages.push(inst);
    }
    let model = Model::open(&manifest.model.path)
        .with_context(|| format!("cannot open the model of {mpath}"))?;
    let windows = match &manifest.calibration {
        None => None,
        Some(c) => {
            let tokenizer = Tokenizer::from_model_dir(&model.dir)?;
            let spec = CalibrationSpec {
                dataset: c.dataset.clone(),
                text_field: c.text_field.clone(),
                nsamples: c.nsamples,
                seqlen: c.seqlen,
                seed: c.seed,
                vocab_size: Some(model.config.vocab_size),
            };
            let w = calibration_windows(&spec, &tokenizer)
                .with_context(|| format!("{mpath}: [calibration]"))?;
            Some(w)
        }
    };
    let family = arch::family_for(
        &model.config.architectures,
        &model.config.path.display().to_string(),
    )?;
    scheduler::validate(&family, &model, &manifest.plan)?;
    let linears = scheduler::all_linears(&family, &model);
    for (i, pattern) in manifest
        .plan
        .unused_overrides(linears.iter().map(String::as_str))
    {
        tracing::warn!(
            "{mpath}: [[quant.override]] #{} pattern `{pattern}` matches no layer",
            i + 1
        );
    }
    let quantized = linears
        .iter()
        .filter(|l| !manifest.plan.scheme_for(l).is_skip())
        .count();
    println!(
        "ok: {} stage(s) [{}]; model {} ({}, {} blocks); {} of {} linear layers quantized; {}; output {} ({})",
        stages.len(),
        stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" → "),
        manifest.model.path.display(),
        model.config.architecture(),
        model.config.num_hidden_layers,
        quantized,
        linears.len(),
        match &windows {
            Some(w) => format!("calibration {} × {} tokens", w.n(), w.seqlen()),
            None => "data-free".to_string(),
        },
        manifest.export.output.display(),
        manifest.export.format.name(),
    );
    Ok(Prepared {
        manifest,
        model,
        family,
        stages,
        windows,
    })
}

fn run(path: &Path, dirs: &[PathBuf], force: bool) -> Result<()> {
    let Prepared {
        manifest,
        model,
        family,
        mut stages,
        windows,
    } = check(path, dirs)?;
    let started = std::time::Instant::now();
    let mut export = FakeQuantExport::begin(&model, &manifest.export.output, force)
        .with_context(|| format!("cannot write {}", manifest.export.output.display()))?;
    let device = CpuDevice::new();
    let calibration = windows.as_ref().map(|w| Calibration {
        windows: w,
        sequential: manifest.run.sequential,
        device: &device,
        chunk_tokens: scheduler::CHUNK_TOKENS,
    });
    let summary = scheduler::run(
        &model,
        &family,
        &manifest.plan,
        &mut stages,
        calibration.as_ref(),
        &mut |n, v| export.replace(n, v).map_err(|e| e.to_string()),
    )?;
    let provenance = provenance(&manifest, &stages, &summary)?;
    export.add_file(RUN_RECORD, provenance.as_bytes())?;
    export.finish()?;
    let quantized = summary
        .layers
        .iter()
        .filter(|l| l.qparams.is_some())
        .count();
    println!(
        "wrote {} ({}): {} blocks, {} layers quantized, {} tensors replaced, {:.1}s",
        manifest.export.output.display(),
        manifest.export.format.name(),
        summary.blocks,
        quantized,
        summary.tensors_written,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The run's provenance, written as `gs-run.json` beside the weights.
fn provenance(
    manifest: &Manifest,
    stages: &[AlgorithmInstance],
    summary: &RunSummary,
) -> Result<String> {
    let text = std::fs::read(&manifest.path)
        .with_context(|| format!("cannot re-read {}", manifest.path.display()))?;
    let layers: Vec<_> = summary
        .layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "name": l.name,
                "scheme": format!("{:?}", l.scheme),
                "metrics": l.metrics.iter().map(|(a, k, v)| serde_json::json!({"algorithm": a, "key": k, "value": v})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "gs_host_version": env!("CARGO_PKG_VERSION"),
        "manifest": {"path": manifest.path.display().to_string(), "sha256": format!("{:x}", Sha256::digest(&text))},
        "model": manifest.model.path.display().to_string(),
        "format": manifest.export.format.name(),
        "pipeline": stages.iter().zip(&manifest.pipeline).map(|(s, st)| serde_json::json!({
            "algorithm": s.name,
            "params": st.params_text(),
            "plugin": s.plugin.name,
            "plugin_version": s.plugin.version,
            "plugin_sha256": s.plugin.sha256,
        })).collect::<Vec<_>>(),
        "layers": layers,
    });
    Ok(serde_json::to_string_pretty(&doc)?)
}
