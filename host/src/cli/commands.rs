//! What each subcommand does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::presets;
use super::{Cli, Command, DeviceFlag, QuantizeArgs};
use crate::arch::{self, Family};
use crate::data::{
    calibration_windows, eval_windows, read_text, CalibrationSpec, TextKind, Tokenizer, Windows,
};
use crate::device::{AscendDevice, CpuDevice, Device};
use crate::eval::perplexity;
use crate::eval::report::{LayerEntry, PerplexityEntry, Report};
use crate::export::{self, ExportOptions, Staging, RUN_RECORD};
use crate::manifest::{
    DeviceKind, DeviceSection, EvalPoint, EvalSection, ExportFormat, Manifest, ManifestError,
};
use crate::model::fakequant::act_quant_to_json;
use crate::model::Model;
use crate::plugins::{
    AlgorithmInstance, LoadedPlugin, Pin, PluginError, PluginRegistry, PluginSource, SearchPath,
};
use crate::scheduler::{
    self, Calibration, Checkpoint, Fingerprint, InRunEval, RunSpec, RunSummary,
};

pub fn dispatch(cli: Cli) -> Result<()> {
    let device = cli.device.as_ref();
    match (&cli.command, &cli.manifest) {
        (Some(Command::Inspect { model }), _) => inspect(model),
        (Some(Command::Devices), _) => super::devices::run(),
        (Some(Command::Plugins { verify: false }), m) => plugins(m.as_deref(), &cli.plugin_dirs),
        (Some(Command::Plugins { verify: true }), m) => {
            verify_plugins(m.as_deref(), &cli.plugin_dirs)
        }
        (
            Some(Command::Eval {
                model,
                data,
                seqlen,
                windows,
            }),
            _,
        ) => eval(model, data, *seqlen, *windows, device),
        (Some(Command::Quantize(_)), Some(_)) => bail!(
            "quantize takes no --manifest: it builds its own from --preset (--print-manifest shows it)"
        ),
        (Some(Command::Quantize(args)), None) => {
            quantize(args, &cli.plugin_dirs, cli.force, cli.resume, device)
        }
        (Some(Command::Check), Some(m)) => {
            check(Source::file(m)?, &cli.plugin_dirs, cli.force).map(|_| ())
        }
        (Some(Command::Run) | None, Some(m)) => {
            run(Source::file(m)?, &cli.plugin_dirs, cli.force, cli.resume, device)
        }
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

/// The directory of a manifest file, where its `plugins/` is searched.
fn manifest_dir(path: &Path) -> Option<&Path> {
    path.parent().map(|d| {
        if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        }
    })
}

/// The plugins: `manifest`'s pins, `plugins/` in `manifest_dir`, the flags, `GS_PLUGIN_PATH`
/// and the built-in directory.
fn registry(
    manifest: Option<&Manifest>,
    manifest_dir: Option<&Path>,
    dirs: &[PathBuf],
) -> Result<PluginRegistry> {
    let search = search_path(manifest_dir, dirs);
    Ok(PluginRegistry::load(&search, &pins(manifest))?)
}

fn search_path(manifest_dir: Option<&Path>, dirs: &[PathBuf]) -> SearchPath {
    let env = std::env::var_os("GS_PLUGIN_PATH");
    SearchPath::standard(manifest_dir, dirs, env.as_deref(), true)
}

/// The manifest's `[plugins.<name>]` pins.
fn pins(manifest: Option<&Manifest>) -> BTreeMap<String, Pin> {
    manifest
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
        .unwrap_or_default()
}

/// `gs-host plugins --verify`: every library on the search path (and every pinned path) gets
/// one verdict — its pin (checked before a pinned path is opened), its ABI major and
/// abi_stable's layout checks — then the cross-plugin checks of a run: duplicate algorithms,
/// pins naming no plugin, pipeline algorithms nobody provides. Nothing is created or run.
fn verify_plugins(manifest: Option<&Path>, dirs: &[PathBuf]) -> Result<()> {
    let m = manifest.map(Manifest::load).transpose()?;
    let pins = pins(m.as_ref());
    let mut search = search_path(manifest.and_then(manifest_dir), dirs);
    for pin in pins.values() {
        if let Some(p) = &pin.path {
            search.files.push((p.clone(), PluginSource::Pinned));
        }
    }
    let files = crate::plugins::discover(&search)?;
    let mut failed = 0usize;
    let mut checked = 0usize;
    let mut provided: Vec<String> = Vec::new();
    for (path, source) in &files {
        match verify_one(path, *source, &pins) {
            Verdict::Skipped => continue,
            Verdict::Ok { line, algorithms } => {
                println!("ok      {line}");
                provided.extend(algorithms);
            }
            Verdict::Failed(why) => {
                failed += 1;
                println!("FAILED  {}: {why}", path.display());
            }
        }
        checked += 1;
    }
    for stage in m.iter().flat_map(|m| &m.pipeline) {
        if !provided.contains(&stage.algorithm) {
            failed += 1;
            println!(
                "FAILED  pipeline algorithm `{}`: no verified plugin provides it (verified: {})",
                stage.algorithm,
                provided.join(", ")
            );
        }
    }
    // What only the whole set can show (two plugins claiming one algorithm, a pin naming no
    // plugin); a failure already reported above would only be repeated.
    if failed == 0 {
        if let Err(e) = PluginRegistry::load(&search, &pins) {
            failed += 1;
            println!("FAILED  {e}");
        }
    }
    if failed > 0 {
        bail!("{failed} plugin check(s) failed ({checked} librar(ies) checked)");
    }
    println!("{checked} plugin(s) verified");
    Ok(())
}

enum Verdict {
    Ok {
        line: String,
        algorithms: Vec<String>,
    },
    Failed(String),
    /// Not a gs-host plugin in the built-in directory (cargo's output holds other libraries).
    Skipped,
}

fn verify_one(path: &Path, source: PluginSource, pins: &BTreeMap<String, Pin>) -> Verdict {
    let sha = match crate::plugins::sha256_file(path) {
        Ok(s) => s,
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    // A pinned path is hashed before it is opened: a mismatch runs none of its code.
    if let Err(e) = crate::plugins::check_pinned_path(path, &sha, pins) {
        return Verdict::Failed(format!("{e}; not opened"));
    }
    let p = match LoadedPlugin::load(path, source) {
        Ok(p) => p,
        Err(PluginError::NotALibrary { .. } | PluginError::NoAbiSymbol { .. })
            if source == PluginSource::BuiltIn =>
        {
            return Verdict::Skipped
        }
        Err(e) => return Verdict::Failed(e.to_string()),
    };
    if let Err(e) = crate::plugins::check_pin(&p, pins) {
        return Verdict::Failed(e.to_string());
    }
    let pin = if pins.contains_key(&p.name) {
        "pinned sha256 matches"
    } else {
        "not pinned"
    };
    let algorithms: Vec<String> = p.algorithms.iter().map(|(a, _)| a.clone()).collect();
    Verdict::Ok {
        line: format!(
            "{} {} (abi {}, gs-plugin-api {}): {}; {pin}; {}",
            p.name,
            p.version,
            p.abi_major,
            p.api_version,
            algorithms.join(", "),
            path.display()
        ),
        algorithms,
    }
}

fn plugins(manifest: Option<&Path>, dirs: &[PathBuf]) -> Result<()> {
    let m = manifest.map(Manifest::load).transpose()?;
    let reg = registry(m.as_ref(), manifest.and_then(manifest_dir), dirs)?;
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

/// A manifest to run and where it came from.
struct Source {
    manifest: Manifest,
    /// The text it was parsed from (its sha256 goes into gs-run.json).
    text: String,
    /// Where `plugins/` is searched: the manifest file's directory; `None` for a preset.
    plugin_dir: Option<PathBuf>,
    /// The `gs-host quantize` command line that expanded a preset into `text`.
    command: Option<String>,
}

impl Source {
    fn file(path: &Path) -> Result<Source> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Source {
            manifest: Manifest::parse(&text, path)?,
            text,
            plugin_dir: manifest_dir(path).map(Path::to_path_buf),
            command: None,
        })
    }
}

/// Everything a run needs, validated; nothing written yet.
struct Prepared {
    manifest: Manifest,
    /// The manifest text and the command that produced it, for the provenance.
    text: String,
    command: Option<String>,
    model: Model,
    family: Family,
    stages: Vec<AlgorithmInstance>,
    /// Calibration windows, when the manifest has `[calibration]`.
    windows: Option<Windows>,
    /// Evaluation windows, when the manifest has `[eval]`.
    eval_windows: Option<Windows>,
}

fn check(source: Source, dirs: &[PathBuf], force: bool) -> Result<Prepared> {
    let Source {
        manifest,
        text,
        plugin_dir,
        command,
    } = source;
    let mpath = manifest.path.display().to_string();
    let reg = registry(Some(&manifest), plugin_dir.as_deref(), dirs)?;
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
    // Before any work: a NaN or infinity would surface blocks later as a plugin result the
    // host refuses (or, in a tensor no stage touches, be copied into the output).
    model
        .weights
        .check_finite()
        .with_context(|| format!("cannot quantize the model of {mpath}"))?;
    // The output is checked again when the run starts; here so a long run cannot fail at its end.
    Staging::check(&manifest.export.output, &model.dir, force)
        .with_context(|| format!("{mpath}: [export] output"))?;
    let family = arch::family_for(
        &model.config.architectures,
        &model.config.path.display().to_string(),
    )
    .with_context(|| format!("cannot quantize the model of {mpath}"))?;
    scheduler::validate(&family, &model, &manifest.plan)
        .with_context(|| format!("cannot quantize the model of {mpath}"))?;
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
        text,
        command,
        model,
        family,
        stages,
        windows,
        eval_windows,
    })
}

/// `gs-host quantize`: the preset expanded with the options into a manifest text, which is
/// printed (`--print-manifest`), or parsed and run exactly as `--manifest` runs a file.
fn quantize(
    args: &QuantizeArgs,
    dirs: &[PathBuf],
    force: bool,
    resume: bool,
    device: Option<&DeviceFlag>,
) -> Result<()> {
    let preset = presets::find(&args.preset)?;
    let opts = presets::Options {
        model: args.model.clone(),
        out: args.out.clone(),
        format: args.format.format(),
        calib: args.calib.clone(),
        nsamples: args.nsamples.map(|n| n as usize),
        seqlen: args.seqlen.map(|n| n as usize),
        seed: args.seed,
        group_size: args.group_size,
    };
    let text = preset.expand(&opts)?;
    if args.print_manifest {
        print!("{text}");
        return Ok(());
    }
    // Names the manifest in messages (line numbers are those of --print-manifest's output);
    // never read: its paths are absolute and no plugins are searched beside it.
    let label = PathBuf::from(format!(
        "expanded preset {} (--print-manifest)",
        preset.name
    ));
    let manifest = Manifest::parse(&text, &label).with_context(|| {
        format!(
            "the expansion of preset {} does not parse (a gs-host defect)",
            preset.name
        )
    })?;
    // The checks a user is most likely to trip, with messages in terms of the options; the
    // manifest checks that follow repeat them.
    let model = Model::open(&manifest.model.path)
        .with_context(|| format!("cannot open model {}", manifest.model.path.display()))?;
    Staging::check(&manifest.export.output, &model.dir, force).context("--out")?;
    check_group_size(preset, args.group_size, &manifest, &model)?;
    let command = presets::command_line(preset.name, &opts);
    run(
        Source {
            manifest,
            text,
            plugin_dir: None,
            command: Some(command),
        },
        dirs,
        force,
        resume,
        device,
    )
}

/// Every quantized layer must hold whole groups; the error names the first that does not and
/// the group sizes that fit every layer of the model.
fn check_group_size(
    preset: &presets::Preset,
    given: Option<u32>,
    manifest: &Manifest,
    model: &Model,
) -> Result<()> {
    let family = arch::family_for(
        &model.config.architectures,
        &model.config.path.display().to_string(),
    )?;
    let mut columns = Vec::new();
    let mut bad = None;
    for name in scheduler::all_linears(&family, model) {
        let Some(w) = manifest.plan.scheme_for(&name).weights else {
            continue;
        };
        let gs_quant::Granularity::Group(g) = w.granularity else {
            continue;
        };
        let shape = model
            .weights
            .info(&format!("{name}.weight"))?
            .shape()
            .to_vec();
        let Some(&inp) = shape.get(1) else {
            continue; // not a matrix: the manifest checks report it
        };
        columns.push(inp);
        if bad.is_none() && (g == 0 || inp % g as usize != 0) {
            bad = Some((name, inp, g));
        }
    }
    let Some((layer, inp, g)) = bad else {
        return Ok(());
    };
    let fits = group_sizes_fitting(&columns);
    let which = match given {
        Some(_) => format!("--group-size {g}"),
        None => format!("preset {}'s group size {g} (--group-size)", preset.name),
    };
    bail!(
        "{which} does not divide the {inp} input columns of {layer}; every quantized layer needs whole groups. Group sizes that fit every layer of this model: {} (pass one with --group-size); or save the --print-manifest output and give such layers their own scheme in [[quant.override]]",
        fits.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// Group sizes dividing every entry of `columns`: the powers of two dividing their greatest
/// common divisor, and that divisor itself.
fn group_sizes_fitting(columns: &[usize]) -> Vec<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let d = columns.iter().copied().fold(0, gcd);
    let mut out: Vec<usize> = std::iter::successors(Some(1usize), |p| p.checked_mul(2))
        .take_while(|p| *p <= d && d % p == 0)
        .collect();
    if d > 0 && out.last() != Some(&d) {
        out.push(d);
    }
    out
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

/// The compute devices of a command: the CPU, or Ascend NPUs (the first one also runs what is
/// not split by calibration chunks: module forwards, evaluation).
enum Devices {
    Cpu(CpuDevice),
    Ascend(Vec<AscendDevice>),
}

impl Devices {
    /// The manifest's `[device]` (the CPU without one), with `--device` taking precedence.
    fn open(section: &DeviceSection, flag: Option<&DeviceFlag>) -> Result<Devices> {
        let (kind, ids, origin) = match flag {
            Some(f) => (f.kind, f.ids.clone(), "--device"),
            None => (section.kind, section.ids.clone(), "[device]"),
        };
        if kind == DeviceKind::Cpu {
            return Ok(Devices::Cpu(CpuDevice::new()));
        }
        let label = format!(
            "ascend:{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        );
        let open = || -> Result<Vec<AscendDevice>, ascendcl_sys::AclError> {
            let rt = ascendcl_sys::Runtime::load()?;
            ids.iter()
                .map(|&id| AscendDevice::open(&rt, id, section.precision))
                .collect()
        };
        let devices = open().with_context(|| format!("{origin}: cannot use {label}"))?;
        tracing::info!(
            "{label}: GEMMs on the NPU ({} inputs, f32 accumulation); RMSNorm, RoPE, attention, \
             SwiGLU and adds on the CPU",
            section.precision.name()
        );
        Ok(Devices::Ascend(devices))
    }

    /// `ascend:0,1 (f16 GEMM inputs)` for NPUs; `None` for the CPU.
    fn label(&self) -> Option<String> {
        match self {
            Devices::Cpu(_) => None,
            Devices::Ascend(v) => Some(format!(
                "ascend:{} ({} GEMM inputs)",
                v.iter()
                    .map(|d| d.id().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                v[0].precision().name()
            )),
        }
    }

    fn primary(&self) -> &dyn Device {
        match self {
            Devices::Cpu(d) => d,
            Devices::Ascend(v) => &v[0],
        }
    }

    /// The devices after the first, for the chunked calibration passes.
    fn parallel(&self) -> Vec<&dyn Device> {
        match self {
            Devices::Cpu(_) => Vec::new(),
            Devices::Ascend(v) => v[1..].iter().map(|d| d as &dyn Device).collect(),
        }
    }

    /// One line per NPU: what went through it and what stayed on the CPU.
    fn report(&self) {
        if let Devices::Ascend(v) = self {
            for d in v {
                let s = d.stats();
                println!(
                    "ascend:{}: {} GEMMs ({} inputs), {} device allocations, {:.1} MiB to the NPU in {} copies, {:.1} MiB back in {}, {} ops on the CPU",
                    d.id(),
                    s.gemms,
                    d.precision().name(),
                    s.allocations,
                    s.h2d_bytes as f64 / (1 << 20) as f64,
                    s.h2d_copies,
                    s.d2h_bytes as f64 / (1 << 20) as f64,
                    s.d2h_copies,
                    s.host_ops
                );
            }
        }
    }
}

fn run(
    source: Source,
    dirs: &[PathBuf],
    force: bool,
    resume: bool,
    device: Option<&DeviceFlag>,
) -> Result<()> {
    let Prepared {
        manifest,
        text,
        command,
        model,
        family,
        mut stages,
        windows,
        eval_windows,
    } = check(source, dirs, force)?;
    let started = std::time::Instant::now();
    let format = manifest.export.format;
    let output = manifest.export.output.clone();
    let options = ExportOptions {
        force,
        max_shard_bytes: manifest.export.max_shard_bytes,
        linears: scheduler::all_linears(&family, &model),
    };
    // Before anything is written: a missing runtime or NPU fails the run here.
    let devices = Devices::open(&manifest.device, device)?;
    let mut export = export::begin(format, &model, &output, &options)
        .with_context(|| format!("cannot write {}", output.display()))?;
    // Only the stages' results are saved: a run without stages has nothing worth resuming.
    let checkpoint = if manifest.pipeline.is_empty() {
        None
    } else {
        let mut fp = fingerprint(&manifest, &text, &model, &stages, windows.as_ref())?;
        // NPU results differ from the CPU's (f16 GEMM inputs): never resume one with the
        // other. CPU runs keep the fingerprint they had before devices existed.
        if let Some(label) = devices.label() {
            fp.parts.insert("device".into(), label);
        }
        let dir = Checkpoint::dir_for(export.output());
        let ck = Checkpoint::open(&dir, &fp, model.config.num_hidden_layers, resume)?;
        if ck.resumable() > 0 {
            println!(
                "resuming from {}: blocks 0..{} are replayed from the interrupted run",
                dir.display(),
                ck.resumable()
            );
        }
        Some(ck)
    };
    let device = devices.primary();
    let parallel = devices.parallel();
    let calibration = windows.as_ref().map(|w| Calibration {
        windows: w,
        sequential: manifest.run.sequential,
        output_error: manifest.run.output_error,
        device,
        parallel: &parallel,
        chunk_tokens: scheduler::CHUNK_TOKENS,
    });
    let points: &[EvalPoint] = manifest.eval.as_ref().map_or(&[], |e| &e.points);
    let in_run = eval_windows.as_ref().map(|w| InRunEval {
        windows: w,
        float: points.contains(&EvalPoint::Float),
        fake_quant: points.contains(&EvalPoint::FakeQuant),
        device,
    });
    let spec = RunSpec {
        model: &model,
        family: &family,
        plan: &manifest.plan,
        rules: export::number_rules(format),
        require_qparams: format != ExportFormat::Fake,
        calibration: calibration.as_ref(),
        eval: in_run.as_ref(),
        checkpoint: checkpoint.as_ref(),
        stage_timeout: manifest.run.stage_timeout,
    };
    // Write errors name the staging file; say which output they are about.
    let writing = || format!("cannot write {}", output.display());
    let summary = match scheduler::run(&spec, &mut stages, &mut export) {
        Ok(s) => s,
        Err(e @ scheduler::ScheduleError::Sink(_)) => {
            return Err(keep_progress(
                checkpoint,
                anyhow::Error::new(e).context(writing()),
            ))
        }
        Err(e) => return Err(keep_progress(checkpoint, e.into())),
    };
    let mut report = build_report(&manifest, &summary, eval_windows.as_ref());
    let provenance = provenance(
        &manifest,
        &text,
        command.as_deref(),
        &stages,
        &summary,
        windows.as_ref(),
    )?;
    export
        .add_file(RUN_RECORD, provenance.as_bytes())
        .with_context(writing)?;
    export
        .add_file(REPORT_JSON, report.to_json().as_bytes())
        .with_context(writing)?;
    export
        .add_file(REPORT_SVG, report.render_svg()?.as_bytes())
        .with_context(writing)?;
    export.finish().with_context(writing)?;
    if let Some(ck) = checkpoint {
        // The output is committed: the checkpoint is no longer needed.
        let dir = ck.dir().to_path_buf();
        if let Err(e) = ck.remove() {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove the checkpoint");
        }
    }
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
            let nll = checkpoint_perplexity(ckpt.as_ref(), &family, w, device)?;
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
    devices.report();
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
    device: &dyn Device,
) -> Result<crate::eval::Nll> {
    let mut inputs = std::collections::BTreeMap::new();
    for block in 0..ckpt.config().num_hidden_layers {
        for name in family.block_linears(block) {
            if let Some(a) = ckpt.input_quant(&name)? {
                inputs.insert(name, a);
            }
        }
    }
    Ok(perplexity(
        device,
        ckpt,
        ckpt.config(),
        family,
        windows,
        &|name| inputs.get(name).copied(),
        scheduler::CHUNK_TOKENS,
    )?)
}

fn eval(
    model: &Path,
    data: &Path,
    seqlen: usize,
    windows: Option<usize>,
    device: Option<&DeviceFlag>,
) -> Result<()> {
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
    let devices = Devices::open(&DeviceSection::default(), device)?;
    let started = std::time::Instant::now();
    let nll = checkpoint_perplexity(ckpt.as_ref(), &family, &w, devices.primary())?;
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
    devices.report();
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
/// `text` is the manifest as parsed; `command`, for a `gs-host quantize` run, the command that
/// expanded it (the text is then recorded too, as no file holds it).
/// A failed run's error, plus where its finished blocks are saved for `--resume`; a checkpoint
/// without a finished block is removed.
fn keep_progress(checkpoint: Option<Checkpoint>, e: anyhow::Error) -> anyhow::Error {
    let Some(ck) = checkpoint else { return e };
    match ck.saved() {
        0 => {
            let dir = ck.dir().to_path_buf();
            if let Err(r) = ck.remove() {
                tracing::warn!(dir = %dir.display(), error = %r, "could not remove the checkpoint");
            }
            e
        }
        n => e.context(format!(
            "the run stopped; blocks 0..{n} are saved in {}: fix the cause and rerun with --resume to continue from block {n}",
            ck.dir().display()
        )),
    }
}

/// What a checkpoint must match to be resumed (see [`Checkpoint`]): the manifest's text, the
/// model's config and safetensors headers (the weight bytes are not hashed: a 70B model would
/// take minutes; a same-size in-place edit of tensor data is not detected), the plugins'
/// libraries and parameters, and the calibration tokens.
fn fingerprint(
    manifest: &Manifest,
    text: &str,
    model: &Model,
    stages: &[AlgorithmInstance],
    calibration: Option<&Windows>,
) -> Result<Fingerprint> {
    let hex = |bytes: &[u8]| format!("{:x}", Sha256::digest(bytes));
    let config_path = model.dir.join(crate::model::CONFIG_FILE);
    let config = std::fs::read(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut weights = Sha256::new();
    for shard in model.weights.shards() {
        weights.update(shard.file_name().as_bytes());
        weights.update((shard.file_len() as u64).to_le_bytes());
        weights.update(shard.header_bytes());
    }
    let pipeline: Vec<String> = stages
        .iter()
        .zip(&manifest.pipeline)
        .map(|(s, st)| format!("{} {} {}", s.name, s.plugin.sha256, st.params_text()))
        .collect();
    let tokens = calibration.map_or_else(String::new, tokens_sha256);
    let parts = [
        ("gs-host", env!("CARGO_PKG_VERSION").to_string()),
        ("manifest", hex(text.as_bytes())),
        ("model config", hex(&config)),
        ("model weights", format!("{:x}", weights.finalize())),
        ("plugins", hex(pipeline.join("\n").as_bytes())),
        ("calibration", tokens),
    ];
    Ok(Fingerprint {
        parts: parts.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    })
}

/// Hex sha256 of the windows' token ids (little-endian u32s): the run record's and the
/// checkpoint fingerprint's identity of the calibration data.
fn tokens_sha256(w: &Windows) -> String {
    let bytes: Vec<u8> = w.ids().iter().flat_map(|i| i.to_le_bytes()).collect();
    format!("{:x}", Sha256::digest(bytes))
}

fn provenance(
    manifest: &Manifest,
    text: &str,
    command: Option<&str>,
    stages: &[AlgorithmInstance],
    summary: &RunSummary,
    calibration: Option<&Windows>,
) -> Result<String> {
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
            "tokens_sha256": tokens_sha256(w),
            "sequential": manifest.run.sequential,
        }),
        _ => serde_json::Value::Null,
    };
    let doc = serde_json::json!({
        "gs_host_version": env!("CARGO_PKG_VERSION"),
        "manifest": match command {
            None => serde_json::json!({"path": manifest.path.display().to_string(), "sha256": format!("{:x}", Sha256::digest(text))}),
            Some(c) => serde_json::json!({"command": c, "sha256": format!("{:x}", Sha256::digest(text)), "text": text}),
        },
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

#[cfg(test)]
mod tests {
    use super::group_sizes_fitting;

    #[test]
    fn fitting_group_sizes_are_the_power_of_two_divisors_of_the_gcd_and_the_gcd() {
        // stories260K: 64 and 172 input columns, gcd 4.
        assert_eq!(group_sizes_fitting(&[64, 172, 64]), [1, 2, 4]);
        // gcd(576, 1536) = 192 = 64 · 3.
        assert_eq!(
            group_sizes_fitting(&[576, 1536]),
            [1, 2, 4, 8, 16, 32, 64, 192]
        );
        assert_eq!(group_sizes_fitting(&[7]), [1, 7]);
        assert!(group_sizes_fitting(&[]).is_empty());
    }
}
