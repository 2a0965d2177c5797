//! The safe layer against the AscendCL emulator (a test stand-in executing on host memory: it
//! proves the call protocol, not NPU numerics or speed).

mod support;

use std::path::Path;

use ascendcl_sys::{
    AclError, DeviceBuffer, GemmDims, GemmInput, Runtime, SearchEnv, Stream, Trans,
};
use half::{bf16, f16};
use support::{emulator_home, emulator_lib, serial, Counters, EnvGuard, Variant};

/// The normal search path, pointed at an emulated CANN home (no override variable).
fn home_env(home: &Path) -> SearchEnv {
    SearchEnv {
        ascend_home: Some(home.as_os_str().to_owned()),
        ..SearchEnv::default()
    }
}

fn load(variant: Variant) -> Result<Runtime, AclError> {
    Runtime::load_with(&home_env(emulator_home(variant)))
}

/// Deterministic values in [-1, 1) with a few exact zeros and signs mixed.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The CPU reference: row-major, sequential f32 sum over k (the order the emulator uses, so
/// the comparison is bit-exact and proves layout, transposes and conversions).
fn reference(dims: GemmDims, a: &[f32], b: &[f32]) -> Vec<f32> {
    let GemmDims { m, n, k, .. } = dims;
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                let x = match dims.trans_a {
                    Trans::N => a[i * k + p],
                    Trans::T => a[p * m + i],
                };
                let y = match dims.trans_b {
                    Trans::N => b[p * n + j],
                    Trans::T => b[j * k + p],
                };
                acc += x * y;
            }
            c[i * n + j] = acc;
        }
    }
    c
}

fn run_gemm<T: GemmInput>(
    stream: &mut Stream,
    dims: GemmDims,
    a: &[T],
    b: &[T],
) -> Result<Vec<f32>, AclError> {
    let dev = stream.device().clone();
    let da = dev.upload(a)?;
    let db = dev.upload(b)?;
    let mut dc: DeviceBuffer<f32> = dev.alloc(dims.m * dims.n)?;
    stream.gemm(dims, 1.0, &da, &db, 0.0, &mut dc)?;
    stream.synchronize()?;
    dc.to_vec()
}

/// `v` in a 16-bit float type.
fn rounded<T>(v: &[f32], from: fn(f32) -> T) -> Vec<T> {
    v.iter().map(|&x| from(x)).collect()
}

/// 16-bit values back in f32 (exact).
fn widened<T: Copy>(v: &[T], to: fn(T) -> f32) -> Vec<f32> {
    v.iter().map(|&x| to(x)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn init_and_finalize_are_balanced_and_everything_is_released() {
    let _s = serial();
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        let rt = load(Variant::Full).unwrap();
        // A second handle shares the initialization.
        let rt2 = load(Variant::Full).unwrap();
        assert_eq!(rt.library_path(), rt2.library_path());
        assert_eq!(rt.device_count().unwrap(), 1);
        assert_eq!(rt.soc_name().as_deref(), Some("Emulated-Ascend910B4"));
        assert_eq!(rt.cann_version().as_deref(), Some("0.0.0-emulator"));
        assert_eq!(rt.acl_version(), Some((1, 0, 0)));
        let dev = rt.open_device(0).unwrap();
        let total = dev.mem_info().unwrap().total;
        let host: Vec<f16> = values(1000, 1).into_iter().map(f16::from_f32).collect();
        let buf = dev.upload(&host).unwrap();
        assert_eq!(dev.mem_info().unwrap().free, total - 2000);
        assert_eq!(buf.to_vec().unwrap(), host);
        let _stream = dev.create_stream().unwrap();
        drop(rt);
        drop(rt2);
        // Buffers, streams and the device keep the runtime alive until they drop.
        assert_eq!(counters.get("initialized"), 1);
    }
    let d = counters.assert_balanced(&before);
    assert_eq!(d.get("init"), 1, "one aclInit for two handles: {d:?}");
}

#[test]
fn gemm_equals_the_cpu_reference_bit_for_bit() {
    let _s = serial();
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        let rt = load(Variant::Full).unwrap();
        let dev = rt.open_device(0).unwrap();
        let mut stream = dev.create_stream().unwrap();
        let (m, n, k) = (7, 5, 33);
        for (trans_a, trans_b) in [
            (Trans::N, Trans::T),
            (Trans::N, Trans::N),
            (Trans::T, Trans::N),
            (Trans::T, Trans::T),
        ] {
            let dims = GemmDims {
                m,
                n,
                k,
                trans_a,
                trans_b,
            };
            let a = values(m * k, 2);
            let b = values(k * n, 3);
            let want = reference(dims, &a, &b);
            let got = run_gemm(&mut stream, dims, &a, &b).unwrap();
            assert_eq!(bits(&got), bits(&want), "f32 {trans_a:?}{trans_b:?}");

            // f16 and bf16 inputs: the reference on the rounded inputs, f32 accumulation.
            let (a16, b16) = (rounded(&a, f16::from_f32), rounded(&b, f16::from_f32));
            let want = reference(
                dims,
                &widened(&a16, f16::to_f32),
                &widened(&b16, f16::to_f32),
            );
            let got = run_gemm(&mut stream, dims, &a16, &b16).unwrap();
            assert_eq!(bits(&got), bits(&want), "f16 {trans_a:?}{trans_b:?}");

            let (abf, bbf) = (rounded(&a, bf16::from_f32), rounded(&b, bf16::from_f32));
            let want = reference(
                dims,
                &widened(&abf, bf16::to_f32),
                &widened(&bbf, bf16::to_f32),
            );
            let got = run_gemm(&mut stream, dims, &abf, &bbf).unwrap();
            assert_eq!(bits(&got), bits(&want), "bf16 {trans_a:?}{trans_b:?}");
        }

        // alpha and beta: c = 2·a·b + 0.5·c (values exact in f32 at these magnitudes).
        let dims = GemmDims {
            m: 2,
            n: 2,
            k: 2,
            trans_a: Trans::N,
            trans_b: Trans::N,
        };
        let da = dev.upload(&[1f32, 2., 3., 4.]).unwrap();
        let db = dev.upload(&[5f32, 6., 7., 8.]).unwrap();
        let mut dc = dev.upload(&[1f32, 1., 1., 1.]).unwrap();
        stream.gemm(dims, 2.0, &da, &db, 0.5, &mut dc).unwrap();
        stream.synchronize().unwrap();
        assert_eq!(dc.to_vec().unwrap(), [38.5, 44.5, 86.5, 100.5]);
    }
    counters.assert_balanced(&before);
}

#[test]
fn loads_racing_with_the_last_drop_never_initialize_twice() {
    let _s = serial();
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..200 {
                    let rt = load(Variant::Full).unwrap();
                    assert_eq!(rt.device_count().unwrap(), 1);
                }
            });
        }
    });
    let d = counters.assert_balanced(&before);
    assert!(d.get("init") >= 1, "{d:?}");
}

#[test]
fn a_stream_may_outlive_every_other_handle() {
    let _s = serial();
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        // The stream (and its GEMM scalars buffer) hold the only Device and Runtime handles:
        // dropping it releases everything, context and finalize last.
        let mut stream = load(Variant::Full)
            .unwrap()
            .open_device(0)
            .unwrap()
            .create_stream()
            .unwrap();
        let dims = GemmDims {
            m: 1,
            n: 1,
            k: 2,
            trans_a: Trans::N,
            trans_b: Trans::N,
        };
        let got = run_gemm(&mut stream, dims, &[1f32, 2.], &[3f32, 4.]).unwrap();
        assert_eq!(got, [11.0]);
    }
    counters.assert_balanced(&before);
}

#[test]
fn gemm_refuses_inconsistent_shapes_and_foreign_buffers_before_calling() {
    let _s = serial();
    let _env = EnvGuard::set(&[("GSEMU_DEVICES", "2")]);
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        let rt = load(Variant::Full).unwrap();
        let d0 = rt.open_device(0).unwrap();
        let d1 = rt.open_device(1).unwrap();
        let mut stream = d0.create_stream().unwrap();
        let a = d0.upload(&[0f32; 6]).unwrap();
        let b = d0.upload(&[0f32; 6]).unwrap();
        let mut c = d0.alloc::<f32>(4).unwrap();
        let dims = GemmDims {
            m: 2,
            n: 2,
            k: 3,
            trans_a: Trans::N,
            trans_b: Trans::T,
        };
        let e = stream
            .gemm(GemmDims { k: 4, ..dims }, 1.0, &a, &b, 0.0, &mut c)
            .unwrap_err();
        assert!(matches!(e, AclError::Invalid { op: "gemm", .. }), "{e}");
        assert!(
            e.to_string().contains("a has 6 elements, expected 2×4"),
            "{e}"
        );
        let e = stream
            .gemm(GemmDims { m: 0, ..dims }, 1.0, &a, &b, 0.0, &mut c)
            .unwrap_err();
        assert!(e.to_string().contains("dimensions must be"), "{e}");
        let b1 = d1.upload(&[0f32; 6]).unwrap();
        let e = stream.gemm(dims, 1.0, &a, &b1, 0.0, &mut c).unwrap_err();
        assert!(e.to_string().contains("same Device"), "{e}");
        stream.gemm(dims, 1.0, &a, &b, 0.0, &mut c).unwrap();
        stream.synchronize().unwrap();
        assert_eq!(c.to_vec().unwrap(), [0.0; 4]);
    }
    let d = counters.assert_balanced(&before);
    assert_eq!(d.get("gemms_enqueued"), 1, "{d:?}");
}

#[test]
fn two_devices_have_their_own_memory_and_work_from_any_thread() {
    let _s = serial();
    let _env = EnvGuard::set(&[("GSEMU_DEVICES", "2"), ("GSEMU_DEVICE_MEMORY", "1048576")]);
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        let rt = load(Variant::Full).unwrap();
        assert_eq!(rt.device_count().unwrap(), 2);
        let d0 = rt.open_device(0).unwrap();
        let d1 = rt.open_device(1).unwrap();
        let _b = d1.alloc::<f32>(1024).unwrap();
        assert_eq!(d0.mem_info().unwrap().free, 1 << 20);
        assert_eq!(d1.mem_info().unwrap().free, (1 << 20) - 4096);
        // Over the device's memory: the runtime's out-of-memory error, named.
        let e = d0.alloc::<f32>(1 << 20).unwrap_err();
        assert_eq!(e.code(), Some(207001), "{e}");
        assert!(
            e.to_string().contains(
                "aclrtMalloc (4194304 bytes, device 0) failed: ACL_ERROR_RT_MEMORY_ALLOCATION"
            ),
            "{e}"
        );

        // Each thread makes the device's context current itself.
        std::thread::scope(|s| {
            for dev in [&d0, &d1] {
                s.spawn(move || {
                    let mut stream = dev.create_stream().unwrap();
                    let dims = GemmDims {
                        m: 3,
                        n: 4,
                        k: 5,
                        trans_a: Trans::N,
                        trans_b: Trans::T,
                    };
                    let a = values(15, dev.id() as u64);
                    let b = values(20, 9);
                    let got = run_gemm(&mut stream, dims, &a, &b).unwrap();
                    assert_eq!(bits(&got), bits(&reference(dims, &a, &b)));
                });
            }
        });
        // Device ids past the count are refused by the runtime.
        let e = rt.open_device(2).unwrap_err();
        assert!(
            e.to_string()
                .contains("aclrtSetDevice (device 2) failed: ACL_ERROR_RT_INVALID_DEVICEID"),
            "{e}"
        );
    }
    counters.assert_balanced(&before);
}

#[test]
fn an_injected_malloc_failure_names_the_call_and_leaks_nothing() {
    let _s = serial();
    let _env = EnvGuard::set(&[("GSEMU_FAIL", "aclrtMalloc:2")]);
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        let rt = load(Variant::Full).unwrap();
        let dev = rt.open_device(0).unwrap();
        let _first = dev.alloc::<f32>(16).unwrap();
        let e = dev.alloc::<f32>(16).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("aclrtMalloc (64 bytes, device 0) failed: ACL_ERROR_RT_MEMORY_ALLOCATION (207001); runtime says: [gs-host AscendCL emulator] injected failure"), "{msg}");
        let _third = dev.alloc::<f32>(16).unwrap();
    }
    let d = counters.assert_balanced(&before);
    assert_eq!(d.get("mallocs"), 2, "{d:?}");
}

#[test]
fn an_injected_copy_failure_names_the_call_and_frees_the_new_buffer() {
    let _s = serial();
    let _env = EnvGuard::set(&[("GSEMU_FAIL", "aclrtMemcpy:1")]);
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        let rt = load(Variant::Full).unwrap();
        let dev = rt.open_device(0).unwrap();
        let e = dev.upload(&[1f32, 2., 3.]).unwrap_err();
        assert!(e.to_string().starts_with("aclrtMemcpy (12 bytes host to device, device 0) failed: ACL_ERROR_RT_COPY_DATA (507052)"), "{e}");
        let b = dev.upload(&[1f32, 2., 3.]).unwrap();
        assert_eq!(b.to_vec().unwrap(), [1., 2., 3.]);
    }
    let d = counters.assert_balanced(&before);
    assert_eq!(d.get("mallocs"), 2, "{d:?}");
}

#[test]
fn an_injected_gemm_failure_names_the_call() {
    let _s = serial();
    let _env = EnvGuard::set(&[("GSEMU_FAIL", "aclblasGemmEx:1")]);
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        let rt = load(Variant::Full).unwrap();
        let dev = rt.open_device(0).unwrap();
        let mut stream = dev.create_stream().unwrap();
        let dims = GemmDims {
            m: 1,
            n: 1,
            k: 1,
            trans_a: Trans::N,
            trans_b: Trans::N,
        };
        let e = run_gemm(&mut stream, dims, &[1f32], &[1f32]).unwrap_err();
        assert!(e.to_string().starts_with("aclblasGemmEx (m=1, n=1, k=1, f32, device 0) failed: ACL_ERROR_RT_INTERNAL_ERROR (507000)"), "{e}");
    }
    counters.assert_balanced(&before);
}

#[test]
fn a_failing_init_is_reported_and_the_next_load_starts_clean() {
    let _s = serial();
    let counters = Counters::open(Variant::Full);
    let before = counters.snapshot();
    {
        let _env = EnvGuard::set(&[("GSEMU_FAIL", "aclInit:1")]);
        let e = load(Variant::Full).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("aclInit failed: ACL_ERROR_RT_INTERNAL_ERROR (507000); runtime says:"),
            "{e}"
        );
    }
    {
        let rt = load(Variant::Full).unwrap();
        assert_eq!(rt.device_count().unwrap(), 1);
    }
    let d = counters.assert_balanced(&before);
    assert_eq!(d.get("init"), 1, "{d:?}");
}

#[test]
fn a_missing_library_gives_the_clear_error() {
    let _s = serial();
    let empty = tempfile::tempdir().unwrap();
    let env = SearchEnv {
        ascend_home: Some(empty.path().as_os_str().to_owned()),
        ld_library_path: Some(empty.path().join("ld").into_os_string()),
        default_install: true,
        ..SearchEnv::default()
    };
    let e = Runtime::load_with(&env).unwrap_err();
    assert!(matches!(e, AclError::NotFound { .. }), "{e}");
    let msg = e.to_string();
    for part in [
        "no AscendCL runtime found: libascendcl.so is not in ",
        &format!(
            "{} ($ASCEND_HOME_PATH/lib64)",
            empty.path().join("lib64/libascendcl.so").display()
        ),
        &format!(
            "{} ($LD_LIBRARY_PATH)",
            empty.path().join("ld/libascendcl.so").display()
        ),
        "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so (default CANN install)",
        "; not set: $GS_ASCENDCL_LIB, $ASCEND_TOOLKIT_HOME;",
        "`source /usr/local/Ascend/ascend-toolkit/set_env.sh`",
    ] {
        assert!(msg.contains(part), "missing {part:?} in {msg}");
    }
    // A file that is not a loadable library: the loader's reason, and the same hint.
    let bogus = empty.path().join("libascendcl.so");
    std::fs::write(&bogus, b"not an ELF file").unwrap();
    let e = Runtime::load_with(&SearchEnv::file(&bogus)).unwrap_err();
    assert!(matches!(e, AclError::Load { .. }), "{e}");
    assert!(e.to_string().contains("set_env.sh"), "{e}");
}

#[test]
fn a_missing_symbol_names_the_symbol_and_the_library() {
    let _s = serial();
    let lib = emulator_lib(Variant::HideSymbol);
    let e = Runtime::load_with(&SearchEnv::file(&lib)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the AscendCL library {} has no symbol aclrtSynchronizeStream (is it a CANN version this build supports?)",
            lib.display()
        )
    );
    let counters = Counters::open(Variant::HideSymbol);
    assert_eq!(
        counters.get("init"),
        0,
        "aclInit must not run on a refused library"
    );
}

#[test]
fn a_missing_cblas_library_is_reported_where_gemm_needs_it() {
    let _s = serial();
    let counters = Counters::open(Variant::NoCblas);
    let before = counters.snapshot();
    {
        let rt = load(Variant::NoCblas).unwrap();
        let e = rt.load_blas().unwrap_err();
        let beside = emulator_home(Variant::NoCblas).join("lib64/libacl_cblas.so");
        assert!(
            e.to_string().starts_with(&format!(
                "no AscendCL runtime found: libacl_cblas.so is not in {} (beside ",
                beside.display()
            )),
            "{e}"
        );
        let dev = rt.open_device(0).unwrap();
        let mut stream = dev.create_stream().unwrap();
        let dims = GemmDims {
            m: 1,
            n: 1,
            k: 1,
            trans_a: Trans::N,
            trans_b: Trans::N,
        };
        let e = run_gemm(&mut stream, dims, &[1f32], &[1f32]).unwrap_err();
        assert!(
            matches!(
                e,
                AclError::NotFound {
                    file: "libacl_cblas.so",
                    ..
                }
            ),
            "{e}"
        );
    }
    counters.assert_balanced(&before);
}

#[test]
fn the_override_variable_selects_the_library() {
    let _s = serial();
    let lib = emulator_lib(Variant::Full);
    let _env = EnvGuard::set(&[("GS_ASCENDCL_LIB", lib.to_str().unwrap())]);
    let rt = Runtime::load().unwrap();
    assert_eq!(rt.library_path(), lib);
    assert!(rt.load_blas().unwrap().ends_with("lib64/libacl_cblas.so"));
    rt.set_op_model_dir(Path::new("/nonexistent/op_models"))
        .unwrap();
}
