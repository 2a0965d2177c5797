//! The calibrated block scheduler through real plugins: statistics are what the definition
//! says, computed once per block, and recomputed (never served stale) after an upstream change.

use std::collections::BTreeMap;
use std::path::Path;

use gs_host::arch::family_for;
use gs_host::data::{calibration_windows, CalibrationSpec, Tokenizer, Windows};
use gs_host::device::{CpuDevice, Device};
use gs_host::export::number_rules;
use gs_host::manifest::{ExportFormat, Manifest};
use gs_host::model::forward::Decoder;
use gs_host::model::Model;
use gs_host::plugins::{PluginRegistry, PluginSource, SearchPath};
use gs_host::scheduler::{self, Calibration, Discard, RunSpec, RunSummary};
use gs_tests::*;

fn windows(model: &Path) -> Windows {
    let spec = CalibrationSpec {
        dataset: root().join("assets/data/tinystories/tinystories-sample.txt"),
        text_field: "text".into(),
        nsamples: 16,
        seqlen: 64,
        seed: 0,
        vocab_size: None,
    };
    calibration_windows(&spec, &Tokenizer::from_model_dir(model).unwrap()).unwrap()
}

/// Runs `algorithms` (test plugins) with calibration on the bundled model; returns the summary.
fn run(algorithms: &[&str]) -> RunSummary {
    run_chunked(algorithms, scheduler::CHUNK_TOKENS)
}

fn run_chunked(algorithms: &[&str], chunk_tokens: usize) -> RunSummary {
    run_on(algorithms, chunk_tokens, 1)
}

/// [`run_chunked`] with the calibration chunks split across `devices` CPU devices.
fn run_on(algorithms: &[&str], chunk_tokens: usize, devices: usize) -> RunSummary {
    let model = Model::open(&stories260k()).unwrap();
    let family = family_for(&model.config.architectures, "config.json").unwrap();
    let work = tempfile::tempdir().unwrap();
    let m = write_manifest(
        work.path(),
        &manifest_text(
            &stories260k(),
            &work.path().join("out"),
            "[[pipeline]]\nalgorithm = \"rtn\"",
        ),
    );
    let plan = Manifest::load(&m).unwrap().plan;
    let dir = misbehave_plugin().parent().unwrap().to_path_buf();
    let reg = PluginRegistry::load(
        &SearchPath {
            dirs: vec![(dir, PluginSource::Flag)],
            files: vec![],
        },
        &BTreeMap::new(),
    )
    .unwrap();
    let mut stages: Vec<_> = algorithms
        .iter()
        .map(|a| reg.create(a, "").unwrap())
        .collect();
    let w = windows(&stories260k());
    let device = CpuDevice::new();
    let more: Vec<CpuDevice> = (1..devices).map(|_| CpuDevice::new()).collect();
    let parallel: Vec<&dyn Device> = more.iter().map(|d| d as &dyn Device).collect();
    let calib = Calibration {
        windows: &w,
        sequential: true,
        output_error: true,
        device: &device,
        parallel: &parallel,
        chunk_tokens,
    };
    let spec = RunSpec {
        model: &model,
        family: &family,
        plan: &plan,
        rules: number_rules(ExportFormat::Fake),
        require_qparams: false,
        calibration: Some(&calib),
        eval: None,
        checkpoint: None,
        stage_timeout: None,
    };
    scheduler::run(&spec, &mut stages, &mut Discard).unwrap()
}

/// The `key` metrics a layer received, in pipeline order.
fn metric(s: &RunSummary, layer: &str, key: &str) -> Vec<f64> {
    let l = s.layers.iter().find(|l| l.name == layer).unwrap();
    l.metrics
        .iter()
        .filter(|(_, k, _)| k == key)
        .map(|(_, _, v)| *v)
        .collect()
}

const Q0: &str = "model.layers.0.self_attn.q_proj";

#[test]
fn served_statistics_equal_their_definition() {
    let s = run(&["test_stats_probe"]);
    // The qkv input of block 0 is X = RMSNorm(embed(ids)) ⊙ γ, [16·64 tokens, 64].
    let model = Model::open(&stories260k()).unwrap();
    let w = windows(&stories260k());
    let h = Decoder::new(&model).unwrap().embed(w.ids()).unwrap();
    let gamma = model
        .weights
        .to_f32("model.layers.0.input_layernorm.weight")
        .unwrap();
    let mut x = vec![0.0; h.len()];
    CpuDevice::new()
        .rms_norm(&h, &gamma, model.config.rms_norm_eps as f32, &mut x)
        .unwrap();
    let trace: f64 = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert_eq!(metric(&s, Q0, "tokens"), [1024.0]);
    assert_eq!(metric(&s, Q0, "absmax_max"), [f64::from(absmax)]);
    let got = metric(&s, Q0, "hessian_trace")[0];
    assert!(
        (got - trace).abs() <= 1e-5 * trace,
        "trace {got} vs {trace}"
    );
}

#[test]
fn a_statistic_requested_by_two_stages_is_computed_once_per_block() {
    let s = run(&["test_stats_probe", "test_stats_probe"]);
    assert_eq!(s.stats_passes, 5, "one pass per block of stories260K");
    let t = metric(&s, Q0, "hessian_trace");
    assert_eq!(t.len(), 2);
    assert_eq!(t[0], t[1]);
}

#[test]
fn an_upstream_change_is_never_served_stale() {
    let s = run(&["test_stats_probe", "test_double_norm", "test_stats_probe"]);
    // Doubling input_layernorm doubles the qkv input exactly, so XᵀX is 4× — the second probe
    // must see it, which takes a second pass in every block.
    assert_eq!(s.stats_passes, 10);
    let t = metric(&s, Q0, "hessian_trace");
    assert_eq!(t.len(), 2);
    assert_eq!(t[1], 4.0 * t[0], "{t:?}");
    let a = metric(&s, Q0, "absmax_max");
    assert_eq!(a[1], 2.0 * a[0]);
}

#[test]
fn the_module_forward_runs_the_inspected_module_with_candidate_weights() {
    let s = run(&["test_module_probe"]);
    // Independently: block 0's attention (through o_proj) on its qkv input.
    let model = Model::open(&stories260k()).unwrap();
    let family = family_for(&model.config.architectures, "config.json").unwrap();
    let w = windows(&stories260k());
    let h = Decoder::new(&model).unwrap().embed(w.ids()).unwrap();
    let bw = gs_host::model::forward::BlockWeights::load(&model, &family, 0).unwrap();
    let dev = CpuDevice::new();
    let mut x = vec![0.0; h.len()];
    dev.rms_norm(&h, &bw.input_norm, model.config.rms_norm_eps as f32, &mut x)
        .unwrap();
    let y =
        gs_host::model::forward::attention_forward(&dev, &model.config, &bw, &x, w.n(), w.seqlen())
            .unwrap();
    let expected: f64 = y.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    let got = metric(&s, Q0, "out_sq")[0];
    assert!(
        (got - expected).abs() <= 1e-6 * expected,
        "{got} vs {expected}"
    );
    assert_eq!(metric(&s, Q0, "out_sq_again"), [got]);
    // A zeroed candidate reaches the module: o_proj, gate_proj (silu(0)·up = 0) and down_proj
    // outputs vanish; the source weights are untouched (the second call above was unchanged).
    for layer in ["self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"] {
        let name = format!("model.layers.0.{layer}");
        assert_eq!(metric(&s, &name, "out_sq_zero_first"), [0.0], "{name}");
        assert!(metric(&s, &name, "out_sq")[0] > 0.0, "{name}");
    }
}

#[test]
fn splitting_the_chunks_across_devices_changes_no_bit_of_the_statistics() {
    // 16 chunks of one sequence on 1 and on 3 devices (rounds of 3, the last one short), with
    // a stage that changes weights (statistics recomputed, paused passes resumed) and the
    // module-forward service: the chunks' results are reduced in chunk order, so every
    // statistic and metric is bit-equal.
    let algorithms = ["test_double_norm", "test_stats_probe", "test_module_probe"];
    let (one, three) = (run_on(&algorithms, 64, 1), run_on(&algorithms, 64, 3));
    assert!(!one.layers.is_empty());
    assert_eq!(one.stats_passes, three.stats_passes);
    for (a, b) in one.layers.iter().zip(&three.layers) {
        // Debug prints every float in its shortest round-trip form: equal text, equal bits.
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{}", a.name);
    }
}

#[test]
fn chunking_the_calibration_tokens_does_not_change_the_statistics() {
    // One sequence (64 tokens) per forward call against all 16 at once.
    let (one, all) = (
        run_chunked(&["test_stats_probe"], 64),
        run(&["test_stats_probe"]),
    );
    for layer in [
        "self_attn.q_proj",
        "self_attn.o_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ] {
        for block in [0, 4] {
            let name = format!("model.layers.{block}.{layer}");
            assert_eq!(metric(&one, &name, "tokens"), [1024.0]);
            // GEMM kernels may block rows differently: equal up to rounding.
            let (a, b) = (
                metric(&one, &name, "absmax_max")[0],
                metric(&all, &name, "absmax_max")[0],
            );
            assert!((a - b).abs() <= 1e-6 * b, "{name}: {a} vs {b}");
            let (a, b) = (
                metric(&one, &name, "hessian_trace")[0],
                metric(&all, &name, "hessian_trace")[0],
            );
            assert!((a - b).abs() <= 1e-5 * b, "{name}: {a} vs {b}");
        }
    }
}
