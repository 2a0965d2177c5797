//! For the first run on a machine with an Ascend NPU and CANN (none exists where this was
//! written): the safe layer against the real runtime. Opt-in:
//!
//! ```sh
//! source /usr/local/Ascend/ascend-toolkit/set_env.sh
//! GS_ASCEND_HARDWARE=1 cargo test -p ascendcl-sys --test hardware -- --ignored --nocapture
//! ```
//!
//! `GS_ASCEND_OP_MODEL_DIR` is passed to `aclopSetModelDir` when set (if the runtime wants a
//! compiled GEMM operator model for `aclblasGemmEx`).

use ascendcl_sys::{GemmDims, Runtime, Trans};
use half::f16;

#[test]
#[ignore = "needs an Ascend NPU and CANN; run with GS_ASCEND_HARDWARE=1 and --ignored"]
fn the_safe_layer_on_real_hardware() {
    if std::env::var_os("GS_ASCEND_HARDWARE").is_none() {
        eprintln!("GS_ASCEND_HARDWARE not set: skipped");
        return;
    }
    let rt = Runtime::load().expect("runtime");
    eprintln!(
        "runtime {} ({:?}, {:?}), {} NPU(s), SoC {:?}",
        rt.library_path().display(),
        rt.cann_version(),
        rt.acl_version(),
        rt.device_count().expect("device count"),
        rt.soc_name()
    );
    if let Some(dir) = std::env::var_os("GS_ASCEND_OP_MODEL_DIR") {
        rt.set_op_model_dir(dir.as_ref()).expect("aclopSetModelDir");
    }
    let dev = rt.open_device(0).expect("device 0");
    eprintln!("memory {:?}", dev.mem_info().expect("mem info"));

    // Round trip.
    let host: Vec<f32> = (0..4096).map(|i| i as f32 * 0.25 - 17.0).collect();
    let buf = dev.upload(&host).expect("upload");
    assert_eq!(buf.to_vec().expect("download"), host);

    // A linear layer x[m,k]·w[n,k]ᵀ in f16 with f32 accumulation, against the CPU. Products of
    // two f16 are exact in f32; only the summation order differs.
    let (m, n, k) = (64, 48, 256);
    let x: Vec<f16> = (0..m * k)
        .map(|i| f16::from_f32(((i * 7919) % 251) as f32 / 251.0 - 0.5))
        .collect();
    let w: Vec<f16> = (0..n * k)
        .map(|i| f16::from_f32(((i * 104729) % 241) as f32 / 241.0 - 0.5))
        .collect();
    let mut want = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = (0..k)
                .map(|p| x[i * k + p].to_f32() * w[j * k + p].to_f32())
                .sum();
        }
    }
    let mut stream = dev.create_stream().expect("stream");
    let dx = dev.upload(&x).expect("x");
    let dw = dev.upload(&w).expect("w");
    // Filled with NaN: shows whether the runtime reads C when beta = 0.
    let mut dc = dev.upload(&vec![f32::NAN; m * n]).expect("c");
    let dims = GemmDims {
        m,
        n,
        k,
        trans_a: Trans::N,
        trans_b: Trans::T,
    };
    stream
        .gemm(dims, 1.0, &dx, &dw, 0.0, &mut dc)
        .expect("aclblasGemmEx");
    stream.synchronize().expect("synchronize");
    let got = dc.to_vec().expect("c back");
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0f32, f32::max);
    eprintln!("gemm f16→f32 {m}×{n}×{k}: worst relative difference {worst:e}");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "C was read with beta = 0"
    );
    assert!(worst < 1e-4, "worst relative difference {worst:e}");
}
