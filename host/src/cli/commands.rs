//! What each subcommand does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{Cli, Command};
use crate::arch::{self, Family};
use crate::data::{
    calibration_windows, eval_windows, read_text, CalibrationSpec, TextKind, Tokenizer, Windows,
};
use crate::device::CpuDevice;
use crate::eval::perplexity;
use crate::eval::report::{LayerEntry, PerplexityEntry, Report};
use crate::export::{self, ExportOptions, Staging, RUN_RECORD};
use crate::manifest::{EvalPoint, EvalSection, ExportFormat, Manifest};
use crate::model::fakequant::act_quant_to_json;
use crate::model::Model;
use crate::plugins::{AlgorithmInstance, Pin, PluginRegistry, SearchPath};
use crate::scheduler::{self, Calibration, InRunEval, RunSpec, RunSummary};

pub fn dispatch(cli: Cli) -> Result<()> {
    match (&cli.command, &cli.manifest) {
        (Some(Command::Inspect { model }), _) => inspect(model),
        (Some(Command::Plugins), m) => plugins(m.as_deref(), &cli.plugin_dirs),
        (
            Some(Command::Eval {
                model,
                data,
                seqlen,
                windows,
            }),
            _,
        ) => eval(model, data, *seqlen, *windows),
        (Some(Command::Check), Some(m)) => check(m, &cli.plugin_dirs, cli.force).map(|_| ()),
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
    /// Evaluation windows, when the manifest has `[eval]`.
    eval_windows: Option<Windows>,
}

fn check(path: &Path, dirs: &[PathBuf], force: bool) -> Result<Prepared> {
    let manifest = Manifest::load(path)?;
    let mpath = manifest.path.display().to_string();
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
    // The output is checked again when the run starts; here so a long run cannot fail at its end.
    Staging::check(&manifest.export.output, &model.dir, force)
        .with_context(|| format!("{mpath}: [export] output"))?;
    let family = arch::family_for(
        &model.config.architectures,
        &model.config.path.display().to_string(),
    )?;
    scheduler::validate(&family, &model, &manifest.plan)?;
    let linears = scheduler::all_linears(&family, &model);
    let format = manifest.export.format;
    for name in &linears {
        let scheme = manifest.plan.scheme_for(name);
        export::check_scheme(format, name, &scheme).map_err(|e| {
            anyhow::anyhow!("{mpath}: [export] format = \"{}\": {e}", format.name())
        })?;
        if let Some(a) = scheme.activations.filter(|a| !a.dynamic) {
            if manifest.calibration.is_none() {
                bail!(
                    "{mpath}: {name} has static {}-bit activation quantization, whose scale is calibrated; add a [calibration] section or make the activations dynamic",
                    a.args.bits
                );
            }
        }
    }
    let schemes: Vec<_> = linears
        .iter()
        .map(|n| (n.clone(), manifest.plan.scheme_for(n)))
        .collect();
    export::check_plan(format, &schemes)
        .map_err(|e| anyhow::anyhow!("{mpath}: [export] format = \"{}\": {e}", format.name()))?;
    if format != ExportFormat::Fake {
        scheduler::check_fused_schemes(&family, &model, &manifest.plan)
            .map_err(|e| anyhow::anyhow!("{mpath}: {e}"))?;
    }
    for (i, pattern) in manifest
        .plan
        .unused_overrides(linears.iter().map(String::as_str))
    {
        tracing::warn!(
            "{mpath}: [[quant.override]] #{} pattern `{pattern}` matches no layer",
            i + 1
        );
    }
    let tokenizer = || Tokenizer::from_model_dir(&model.dir);
    let windows = match &manifest.calibration {
        None => None,
        Some(c) => {
            let spec = CalibrationSpec {
                dataset: c.dataset.clone(),
                text_field: c.text_field.clone(),
                nsamples: c.nsamples,
                seqlen: c.seqlen,
                seed: c.seed,
                vocab_size: Some(model.config.vocab_size),
            };
            let w = calibration_windows(&spec, &tokenizer()?)
                .with_context(|| format!("{mpath}: [calibration]"))?;
            Some(w)
        }
    };
    let eval_windows = match &manifest.eval {
        None => None,
        Some(e) => Some(
            evaluation_windows(&tokenizer()?, &e.dataset, e.seqlen, e.windows)
                .with_context(|| format!("{mpath}: [eval]"))?,
        ),
    };
    let quantized = linears
        .iter()
        .filter(|l| !manifest.plan.scheme_for(l).is_skip())
        .count();
    println!(
        "ok: {} stage(s) [{}]; model {} ({}, {} blocks); {} of {} linear layers quantized; {}; output {} ({}){}",
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
        match (&manifest.eval, &eval_windows) {
            (Some(e), Some(w)) => format!(
                "; eval {} at {} × {} tokens",
                e.points.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
                w.n(),
                w.seqlen()
            ),
            _ => String::new(),
        },
    );
    Ok(Prepared {
        manifest,
        model,
        family,
        stages,
        windows,
        eval_windows,
    })
}

/// Evaluation windows of a text file under the perplexity protocol (see `eval::perplexity`).
fn evaluation_windows(
    tokenizer: &Tokenizer,
    data: &Path,
    seqlen: usize,
    windows: Option<usize>,
) -> Result<Windows> {
    let text = read_text(data, &TextKind::Plain)?;
    let ids = tokenizer.encode(&text)?;
    let w = eval_windows(&ids, seqlen, windows);
    if w.n() == 0 {
        bail!(
            "{}: {} tokens is less than one window of {seqlen}; use a longer text or a smaller seqlen",
            data.display(),
            ids.len()
        );
    }
    Ok(w)
}

fn run(path: &Path, dirs: &[PathBuf], force: bool) -> Result<()> {
    let Prepared {
        manifest,
        model,
        family,
        mut stages,
        windows,
        eval_windows,
    } = check(path, dirs, force)?;
    let started = std::time::Instant::now();
    let format = manifest.export.format;
    let output = manifest.export.output.clone();
    let options = ExportOptions {
        force,
        max_shard_bytes: manifest.export.max_shard_bytes,
        linears: scheduler::all_linears(&family, &model),
    };
    let mut export = export::begin(format, &model, &output, &options)
        .with_context(|| format!("cannot write {}", output.display()))?;
    let device = CpuDevice::new();
    let calibration = windows.as_ref().map(|w| Calibration {
        windows: w,
        sequential: manifest.run.sequential,
        device: &device,
        chunk_tokens: scheduler::CHUNK_TOKENS,
    });
    let points: &[EvalPoint] = manifest.eval.as_ref().map_or(&[], |e| &e.points);
    let in_run = eval_windows.as_ref().map(|w| InRunEval {
        windows: w,
        float: points.contains(&EvalPoint::Float),
        fake_quant: points.contains(&EvalPoint::FakeQuant),
        device: &device,
    });
    let spec = RunSpec {
        model: &model,
        family: &family,
        plan: &manifest.plan,
        rules: export::number_rules(format),
        require_qparams: format != ExportFormat::Fake,
        calibration: calibration.as_ref(),
        eval: in_run.as_ref(),
    };
    let summary = scheduler::run(&spec, &mut stages, &mut export)?;
    let mut report = build_report(&manifest, &summary, eval_windows.as_ref());
    let provenance = provenance(&manifest, &stages, &summary, windows.as_ref())?;
    export.add_file(RUN_RECORD, provenance.as_bytes())?;
    export.add_file(REPORT_JSON, report.to_json().as_bytes())?;
    export.add_file(REPORT_SVG, report.render_svg()?.as_bytes())?;
    export.finish()?;
    let quantized = summary
        .layers
        .iter()
        .filter(|l| l.qparams.is_some())
        .count();
    println!(
        "wrote {} ({}): {} blocks, {} layers quantized, {} tensors written, {:.1}s",
        output.display(),
        format.name(),
        summary.blocks,
        quantized,
        summary.tensors_written,
        started.elapsed().as_secs_f64()
    );
    if let (Some(e), Some(w)) = (&manifest.eval, &eval_windows) {
        if points.contains(&EvalPoint::Exported) {
            let ckpt = export::open_checkpoint(&output).with_context(|| {
                format!("cannot reload the written checkpoint {}", output.display())
            })?;
            let nll = checkpoint_perplexity(ckpt.as_ref(), &family, w)?;
            report
                .perplexity
                .push(ppl_entry(EvalPoint::Exported, nll, e, w));
            rewrite(&output.join(REPORT_JSON), report.to_json().as_bytes())?;
            rewrite(&output.join(REPORT_SVG), report.render_svg()?.as_bytes())?;
        }
        for p in &report.perplexity {
            println!(
                "perplexity {:<10} {:.4} ({} tokens)",
                p.point, p.ppl, p.tokens
            );
        }
        let fake = report
            .perplexity
            .iter()
            .find(|p| p.point == EvalPoint::FakeQuant.name());
        let exported = report
            .perplexity
            .iter()
            .find(|p| p.point == EvalPoint::Exported.name());
        if let (Some(f), Some(x)) = (fake, exported) {
            if f.nll_sum.to_bits() != x.nll_sum.to_bits() {
                tracing::warn!(
                    fake_quant = f.nll_sum,
                    exported = x.nll_sum,
                    "the reloaded checkpoint does not reproduce the fake-quant evaluation exactly"
                );
            }
        }
    }
    println!("report: {}", output.join(REPORT_SVG).display());
    Ok(())
}

/// The per-layer report file names inside an output.
const REPORT_JSON: &str = "report.json";
const REPORT_SVG: &str = "report.svg";

/// Replaces a file of a committed output atomically (temporary file + rename).
fn rewrite(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("gs-tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Perplexity of a (decoded) checkpoint with its own input quantizers.
fn checkpoint_perplexity(
    ckpt: &dyn export::DecodedCheckpoint,
    family: &Family,
    windows: &Windows,
) -> Result<crate::eval::Nll> {
    let mut inputs = std::collections::BTreeMap::new();
    for block in 0..ckpt.config().num_hidden_layers {
        for name in family.block_linears(block) {
            if let Some(a) = ckpt.input_quant(&name)? {
                inputs.insert(name, a);
            }
        }
    }
    let device = CpuDevice::new();
    Ok(perplexity(
        &device,
        ckpt,
        ckpt.config(),
        family,
        windows,
        &|name| inputs.get(name).copied(),
        scheduler::CHUNK_TOKENS,
    )?)
}

fn eval(model: &Path, data: &Path, seqlen: usize, windows: Option<usize>) -> Result<()> {
    if seqlen < 2 {
        bail!("--seqlen must be at least 2 (each window predicts tokens 1..seqlen)");
    }
    if windows == Some(0) {
        bail!("--windows must be at least 1");
    }
    let ckpt = export::open_checkpoint(model)
        .with_context(|| format!("cannot open {}", model.display()))?;
    let family = arch::family_for(
        &ckpt.config().architectures,
        &ckpt.config().path.display().to_string(),
    )?;
    let tokenizer = Tokenizer::from_model_dir(model)?;
    let w = evaluation_windows(&tokenizer, data, seqlen, windows)?;
    let started = std::time::Instant::now();
    let nll = checkpoint_perplexity(ckpt.as_ref(), &family, &w)?;
    println!(
        "perplexity {:.4} ({}; {} windows × {} tokens of {}; {} predicted tokens, sum NLL {:.3}; {:.1}s)",
        nll.perplexity(),
        match ckpt.format() {
            ExportFormat::Fake => "safetensors as stored".to_string(),
            f => format!("{} checkpoint, decoded", f.name()),
        },
        w.n(),
        w.seqlen(),
        data.display(),
        nll.tokens,
        nll.sum,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn ppl_entry(
    point: EvalPoint,
    nll: crate::eval::Nll,
    e: &EvalSection,
    w: &Windows,
) -> PerplexityEntry {
    PerplexityEntry {
        point: point.name().to_string(),
        ppl: nll.perplexity(),
        nll_sum: nll.sum,
        tokens: nll.tokens,
        dataset: e.dataset.display().to_string(),
        seqlen: w.seqlen(),
        windows: w.n(),
    }
}

/// The per-layer report of a run.
fn build_report(
    manifest: &Manifest,
    summary: &RunSummary,
    eval_windows: Option<&Windows>,
) -> Report {
    let mut layers: Vec<LayerEntry> = summary
        .layers
        .iter()
        .filter(|l| l.qparams.is_some())
        .map(|l| LayerEntry {
            name: l.name.clone(),
            block: l.block,
            role: l.role.map(|r| r.name().to_string()).unwrap_or_default(),
            scheme: scheme_label(&l.scheme),
            rel_output_error: l.rel_output_error,
            metrics: l.metrics.clone(),
        })
        .collect();
    // Model order: by block, then as the block computes them.
    let order = |role: &str| {
        crate::arch::LinearRole::ALL
            .iter()
            .position(|r| r.name() == role)
    };
    layers.sort_by_key(|l| (l.block, order(&l.role)));
    let mut perplexity = Vec::new();
    if let (Some(e), Some(w)) = (&manifest.eval, eval_windows) {
        if let Some(n) = summary.float_nll {
            perplexity.push(ppl_entry(EvalPoint::Float, n, e, w));
        }
        if let Some(n) = summary.fake_quant_nll {
            perplexity.push(ppl_entry(EvalPoint::FakeQuant, n, e, w));
        }
    }
    Report {
        model: manifest.model.path.display().to_string(),
        format: manifest.export.format.name().to_string(),
        scheme_summary: {
            let n = manifest.quant.overrides.len();
            let base = scheme_label(&manifest.plan.network_scheme());
            match n {
                0 => base,
                1 => format!("{base} (+1 override)"),
                _ => format!("{base} (+{n} overrides)"),
            }
        },
        layers,
        perplexity,
    }
}

/// A short human form of a scheme: `w4 g128 sym`, `w8 ch sym · a8 tensor static asym`.
pub(crate) fn scheme_label(s: &gs_quant::Scheme) -> String {
    use gs_quant::{Granularity, QuantArgs, QuantType};
    fn args(prefix: char, a: &QuantArgs, token: bool) -> String {
        let ty = match a.ty {
            QuantType::Int => format!("{prefix}{}", a.bits),
            QuantType::Float => format!("{prefix}fp8"),
        };
        let g = match a.granularity {
            Granularity::Tensor => "tensor".to_string(),
            Granularity::Channel if token => "token".to_string(),
            Granularity::Channel => "ch".to_string(),
            Granularity::Group(g) => format!("g{g}"),
        };
        format!("{ty} {g} {}", if a.symmetric { "sym" } else { "asym" })
    }
    let mut out = match &s.weights {
        Some(w) => args('w', w, false),
        None => "float".to_string(),
    };
    if let Some(a) = &s.activations {
        out.push_str(&format!(
            " · {} {}",
            args('a', &a.args, a.dynamic),
            if a.dynamic { "dynamic" } else { "static" }
        ));
    }
    out
}

/// The run's provenance, written as `gs-run.json` beside the weights.
fn provenance(
    manifest: &Manifest,
    stages: &[AlgorithmInstance],
    summary: &RunSummary,
    calibration: Option<&Windows>,
) -> Result<String> {
    let text = std::fs::read(&manifest.path)
        .with_context(|| format!("cannot re-read {}", manifest.path.display()))?;
    let layers: Vec<_> = summary
        .layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "name": l.name,
                "scheme": scheme_label(&l.scheme),
                "quantized": l.qparams.is_some(),
                "input": l.input.as_ref().map(act_quant_to_json),
                "rel_output_error": l.rel_output_error,
                "metrics": l.metrics.iter().map(|(a, k, v)| serde_json::json!({"algorithm": a, "key": k, "value": v})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let calibration = match (&manifest.calibration, calibration) {
        (Some(c), Some(w)) => serde_json::json!({
            "dataset": c.dataset.display().to_string(),
            "nsamples": w.n(),
            "seqlen": w.seqlen(),
            "seed": c.seed,
            "tokens_sha256": format!("{:x}", Sha256::digest(w.ids().iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>())),
            "sequential": manifest.run.sequential,
        }),
        _ => serde_json::Value::Null,
    };
    let doc = serde_json::json!({
        "gs_host_version": env!("CARGO_PKG_VERSION"),
        "manifest": {"path": manifest.path.display().to_string(), "sha256": format!("{:x}", Sha256::digest(&text))},
        "model": manifest.model.path.display().to_string(),
        "format": manifest.export.format.name(),
        "calibration": calibration,
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
