//! **An emulator of the AscendCL runtime, for tests only.** It exports the C functions of
//! `libascendcl.so` and `libacl_cblas.so` that gs-host calls and executes them on host memory,
//! so the tests can prove the *call protocol* (init/finalize balance, contexts made current,
//! every allocation and stream released, errors surfaced) on machines without an NPU. It says
//! nothing about NPU numerics or speed: its GEMM is a plain sequential f32 loop.
//!
//! Configuration (environment, read at every `aclInit`):
//! * `GSEMU_DEVICES` — number of emulated NPUs (default 1); `ASCEND_RT_VISIBLE_DEVICES`
//!   narrows them as the real runtime does.
//! * `GSEMU_DEVICE_MEMORY` — bytes of memory per device (default 32 GiB); allocations beyond
//!   it fail like an out-of-memory device.
//! * `GSEMU_SOC_NAME` — what `aclrtGetSocName` returns (default `Emulated-Ascend910B4`).
//! * `GSEMU_FAIL=call:n[,call:n…]` — the n-th call (1-based, counted since `aclInit`) of each
//!   named function fails, with the error code the real runtime uses for that kind of failure
//!   and a message from `aclGetRecentErrMsg`.
//! * `GSEMU_STATS=FILE` — at `aclFinalize`, write the counters there (`name value` lines).
//!
//! Counters (cumulative for the process; `*_live` are current) are also read with the extra
//! export `gsemu_counter(name)`. `protocol_errors` counts misuse a real runtime might not
//! report: freeing an unknown pointer, destroying a context that still owns streams or memory,
//! a stream used under another context, work pending at destroy, finalize with live resources.
//!
//! Built with the `hide-symbol` feature, it lacks `aclrtSynchronizeStream` (for the
//! missing-symbol test).

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::alloc::{alloc, dealloc, Layout};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, MutexGuard};

use half::{bf16, f16};

type AclError = c_int;

// Codes as the public headers define them.
const ACL_SUCCESS: AclError = 0;
const ACL_ERROR_INVALID_PARAM: AclError = 100000;
const ACL_ERROR_UNINITIALIZE: AclError = 100001;
const ACL_ERROR_REPEAT_INITIALIZE: AclError = 100002;
const ACL_ERROR_INVALID_FILE: AclError = 100003;
const ACL_ERROR_UNSUPPORTED_DATA_TYPE: AclError = 100026;
const ACL_ERROR_REPEAT_FINALIZE: AclError = 100037;
const ACL_ERROR_RT_INVALID_DEVICEID: AclError = 107001;
const ACL_ERROR_RT_CONTEXT_NULL: AclError = 107002;
const ACL_ERROR_RT_STREAM_CONTEXT: AclError = 107003;
const ACL_ERROR_RT_INVALID_HANDLE: AclError = 107017;
const ACL_ERROR_RT_MEMORY_ALLOCATION: AclError = 207001;
const ACL_ERROR_RT_INTERNAL_ERROR: AclError = 507000;
const ACL_ERROR_RT_COPY_DATA: AclError = 507052;

// Enum values used by the calls.
const ACL_MEMCPY_HOST_TO_HOST: u32 = 0;
const ACL_MEMCPY_HOST_TO_DEVICE: u32 = 1;
const ACL_MEMCPY_DEVICE_TO_HOST: u32 = 2;
const ACL_MEMCPY_DEVICE_TO_DEVICE: u32 = 3;
const ACL_FLOAT: c_int = 0;
const ACL_FLOAT16: c_int = 1;
const ACL_BF16: c_int = 27;
const ACL_TRANS_N: u32 = 0;
const ACL_TRANS_T: u32 = 1;
const ACL_COMPUTE_HIGH_PRECISION: u32 = 0;

/// Allocations are aligned like device memory and filled with 0xFF (NaN as floats), so
/// reading memory nobody wrote shows up in results.
const ALIGN: usize = 64;
const POISON: u8 = 0xFF;

#[derive(Default)]
struct Config {
    devices: u32,
    memory: usize,
    soc: CString,
    fail: Vec<(String, u64)>,
    stats: Option<String>,
}

impl Config {
    fn from_env() -> Config {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let mut devices = var("GSEMU_DEVICES")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1u32);
        if let Some(visible) = var("ASCEND_RT_VISIBLE_DEVICES") {
            devices = visible
                .split(',')
                .filter_map(|s| s.trim().parse::<u32>().ok())
                .filter(|&id| id < devices)
                .count() as u32;
        }
        let fail = var("GSEMU_FAIL")
            .map(|v| {
                v.split(',')
                    .filter_map(|item| {
                        let (name, n) = item.split_once(':')?;
                        Some((name.trim().to_owned(), n.trim().parse().ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let soc = var("GSEMU_SOC_NAME").unwrap_or_else(|| "Emulated-Ascend910B4".into());
        Config {
            devices,
            memory: var("GSEMU_DEVICE_MEMORY")
                .and_then(|v| v.parse().ok())
                .unwrap_or(32 << 30),
            soc: CString::new(soc).unwrap_or_default(),
            fail,
            stats: var("GSEMU_STATS"),
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Counters {
    init: i64,
    finalize: i64,
    devices_set: i64,
    devices_reset: i64,
    contexts_created: i64,
    contexts_destroyed: i64,
    streams_created: i64,
    streams_destroyed: i64,
    mallocs: i64,
    frees: i64,
    memcpys: i64,
    gemms_enqueued: i64,
    gemms_run: i64,
    syncs: i64,
    op_model_dirs: i64,
    failures_injected: i64,
    protocol_errors: i64,
}

struct Alloc {
    size: usize,
    ctx: usize,
    device: i32,
}

/// Work enqueued on a stream: runs at `aclrtSynchronizeStream`, if the allocations it touches
/// are still live.
struct Task {
    touches: Vec<usize>,
    run: Box<dyn FnOnce() + Send>,
}

struct StreamState {
    ctx: usize,
    pending: Vec<Task>,
}

#[derive(Default)]
struct State {
    initialized: bool,
    config: Config,
    counters: Counters,
    calls: HashMap<&'static str, u64>,
    device_refs: HashMap<i32, u32>,
    /// Context handle → device. Default contexts (of `aclrtSetDevice`) are here too.
    contexts: HashMap<usize, i32>,
    default_contexts: HashMap<i32, usize>,
    streams: HashMap<usize, StreamState>,
    allocs: BTreeMap<usize, Alloc>,
    next_handle: usize,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
    static RECENT: RefCell<CString> = RefCell::new(CString::default());
}

/// Sets the thread's `aclGetRecentErrMsg` text and returns `code`.
fn fail(code: AclError, msg: String) -> AclError {
    let msg = format!("[gs-host AscendCL emulator] {msg}");
    RECENT.with(|r| *r.borrow_mut() = CString::new(msg).unwrap_or_default());
    code
}

type Guard = MutexGuard<'static, Option<State>>;

fn lock() -> Guard {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts the call and applies injected failures; refuses every call before `aclInit`.
fn enter(name: &'static str, g: &mut Guard) -> Result<(), AclError> {
    let s = g.get_or_insert_with(State::default);
    if !s.initialized {
        return Err(fail(
            ACL_ERROR_UNINITIALIZE,
            format!("{name} called before aclInit"),
        ));
    }
    let n = s.calls.entry(name).or_insert(0);
    *n += 1;
    let n = *n;
    if s.config.fail.iter().any(|(f, k)| f == name && *k == n) {
        s.counters.failures_injected += 1;
        let code = match name {
            "aclrtMalloc" => ACL_ERROR_RT_MEMORY_ALLOCATION,
            "aclrtMemcpy" => ACL_ERROR_RT_COPY_DATA,
            _ => ACL_ERROR_RT_INTERNAL_ERROR,
        };
        return Err(fail(
            code,
            format!("injected failure: call {n} of {name} since aclInit (GSEMU_FAIL)"),
        ));
    }
    Ok(())
}

/// Runs `f` on the state after [`enter`]; a refusal becomes the return code.
fn with_state(name: &'static str, f: impl FnOnce(&mut State) -> AclError) -> AclError {
    let mut g = lock();
    if let Err(code) = enter(name, &mut g) {
        return code;
    }
    match g.as_mut() {
        Some(s) => f(s),
        None => ACL_ERROR_UNINITIALIZE,
    }
}

impl State {
    fn handle(&mut self) -> usize {
        self.next_handle += 1;
        // Distinct, non-null, never dereferenced by callers.
        0x6500_0000 + self.next_handle * 16
    }

    fn current(&self, name: &str) -> Result<usize, AclError> {
        match CURRENT.with(|c| c.get()) {
            Some(ctx) if self.contexts.contains_key(&ctx) => Ok(ctx),
            _ => Err(fail(
                ACL_ERROR_RT_CONTEXT_NULL,
                format!("{name}: no current context on this thread"),
            )),
        }
    }

    fn valid_device(&self, id: i32, name: &str) -> Result<(), AclError> {
        if id >= 0 && (id as u32) < self.config.devices {
            Ok(())
        } else {
            Err(fail(
                ACL_ERROR_RT_INVALID_DEVICEID,
                format!(
                    "{name}: device {id} does not exist ({} emulated)",
                    self.config.devices
                ),
            ))
        }
    }

    /// The base of the live allocation holding `[addr, addr + len)`.
    fn find(&self, addr: usize, len: usize) -> Option<usize> {
        let (&base, a) = self.allocs.range(..=addr).next_back()?;
        (addr.checked_add(len)? <= base + a.size).then_some(base)
    }

    fn device_bytes(&self, device: i32) -> usize {
        self.allocs
            .values()
            .filter(|a| a.device == device)
            .map(|a| a.size)
            .sum()
    }

    fn stream_of_current(&self, stream: usize, name: &str) -> Result<Option<usize>, AclError> {
        let ctx = self.current(name)?;
        if stream == 0 {
            return Ok(None);
        }
        match self.streams.get(&stream) {
            None => Err(fail(
                ACL_ERROR_RT_INVALID_HANDLE,
                format!("{name}: unknown stream {stream:#x}"),
            )),
            Some(st) if st.ctx != ctx => Err(fail(
                ACL_ERROR_RT_STREAM_CONTEXT,
                format!("{name}: stream {stream:#x} belongs to another context"),
            )),
            Some(_) => Ok(Some(stream)),
        }
    }

    fn run_pending(&mut self, stream: usize) {
        let tasks = match self.streams.get_mut(&stream) {
            Some(st) => std::mem::take(&mut st.pending),
            None => return,
        };
        for t in tasks {
            if t.touches.iter().all(|b| self.allocs.contains_key(b)) {
                (t.run)();
                self.counters.gemms_run += 1;
            } else {
                // Memory freed while work on it was still queued.
                self.counters.protocol_errors += 1;
            }
        }
    }

    fn live(&self, name: &str) -> Option<i64> {
        let explicit = self.contexts.len() - self.default_contexts.len();
        Some(match name {
            "allocs_live" => self.allocs.len() as i64,
            "bytes_live" => self.allocs.values().map(|a| a.size).sum::<usize>() as i64,
            "streams_live" => self.streams.len() as i64,
            "contexts_live" => explicit as i64,
            "devices_live" => self.device_refs.values().map(|&r| r as i64).sum(),
            "initialized" => self.initialized as i64,
            _ => return None,
        })
    }

    fn counter(&self, name: &str) -> Option<i64> {
        let c = &self.counters;
        Some(match name {
            "init" => c.init,
            "finalize" => c.finalize,
            "devices_set" => c.devices_set,
            "devices_reset" => c.devices_reset,
            "contexts_created" => c.contexts_created,
            "contexts_destroyed" => c.contexts_destroyed,
            "streams_created" => c.streams_created,
            "streams_destroyed" => c.streams_destroyed,
            "mallocs" => c.mallocs,
            "frees" => c.frees,
            "memcpys" => c.memcpys,
            "gemms_enqueued" => c.gemms_enqueued,
            "gemms_run" => c.gemms_run,
            "syncs" => c.syncs,
            "op_model_dirs" => c.op_model_dirs,
            "failures_injected" => c.failures_injected,
            "protocol_errors" => c.protocol_errors,
            _ => return self.live(name),
        })
    }
}

const COUNTER_NAMES: &[&str] = &[
    "init",
    "finalize",
    "devices_set",
    "devices_reset",
    "contexts_created",
    "contexts_destroyed",
    "streams_created",
    "streams_destroyed",
    "mallocs",
    "frees",
    "memcpys",
    "gemms_enqueued",
    "gemms_run",
    "syncs",
    "op_model_dirs",
    "failures_injected",
    "protocol_errors",
    "allocs_live",
    "bytes_live",
    "streams_live",
    "contexts_live",
    "devices_live",
    "initialized",
];

/// Emulator extra: a counter by name (see the crate docs), or -1 for an unknown name.
#[no_mangle]
pub unsafe extern "C" fn gsemu_counter(name: *const c_char) -> i64 {
    if name.is_null() {
        return -1;
    }
    let name = CStr::from_ptr(name).to_string_lossy();
    let mut g = lock();
    let s = g.get_or_insert_with(State::default);
    s.counter(&name).unwrap_or(-1)
}

#[no_mangle]
pub unsafe extern "C" fn aclInit(_config_path: *const c_char) -> AclError {
    let mut g = lock();
    let s = g.get_or_insert_with(State::default);
    if s.initialized {
        return fail(ACL_ERROR_REPEAT_INITIALIZE, "aclInit called twice".into());
    }
    s.config = Config::from_env();
    s.calls.clear();
    s.initialized = true;
    // aclInit itself can be made to fail (GSEMU_FAIL=aclInit:1).
    if let Err(code) = enter("aclInit", &mut g) {
        if let Some(s) = g.as_mut() {
            s.initialized = false;
        }
        return code;
    }
    if let Some(s) = g.as_mut() {
        s.counters.init += 1;
    }
    ACL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn aclFinalize() -> AclError {
    let mut g = lock();
    let s = g.get_or_insert_with(State::default);
    if !s.initialized {
        return fail(
            ACL_ERROR_REPEAT_FINALIZE,
            "aclFinalize without aclInit".into(),
        );
    }
    if let Err(code) = enter("aclFinalize", &mut g) {
        return code;
    }
    let Some(s) = g.as_mut() else {
        return ACL_ERROR_UNINITIALIZE;
    };
    let explicit_contexts = s.contexts.len() - s.default_contexts.len();
    let devices: u32 = s.device_refs.values().sum();
    if !s.allocs.is_empty() || !s.streams.is_empty() || explicit_contexts > 0 || devices > 0 {
        s.counters.protocol_errors += 1;
    }
    // The real runtime releases everything at finalize; so does this one.
    for (base, a) in std::mem::take(&mut s.allocs) {
        if let Ok(layout) = Layout::from_size_align(a.size, ALIGN) {
            dealloc(base as *mut u8, layout);
        }
    }
    s.streams.clear();
    s.contexts.clear();
    s.default_contexts.clear();
    s.device_refs.clear();
    s.initialized = false;
    s.counters.finalize += 1;
    if let Some(path) = &s.config.stats {
        let mut text = String::new();
        for name in COUNTER_NAMES {
            text.push_str(&format!("{name} {}\n", s.counter(name).unwrap_or(-1)));
        }
        // A failed write shows up as a missing file in the test that asked for it.
        let _ = std::fs::write(path, text);
    }
    ACL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn aclGetRecentErrMsg() -> *const c_char {
    RECENT.with(|r| {
        let r = r.borrow();
        if r.as_bytes().is_empty() {
            std::ptr::null()
        } else {
            r.as_ptr()
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetVersion(
    major: *mut i32,
    minor: *mut i32,
    patch: *mut i32,
) -> AclError {
    if major.is_null() || minor.is_null() || patch.is_null() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclrtGetVersion: null output".into(),
        );
    }
    with_state("aclrtGetVersion", |_| {
        *major = 1;
        *minor = 0;
        *patch = 0;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclsysGetVersionStr(pkg: *mut c_char, out: *mut c_char) -> AclError {
    if pkg.is_null() || out.is_null() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclsysGetVersionStr: null argument".into(),
        );
    }
    let pkg = CStr::from_ptr(pkg).to_string_lossy().into_owned();
    with_state("aclsysGetVersionStr", |_| {
        if pkg != "runtime" {
            return fail(
                ACL_ERROR_INVALID_FILE,
                format!("aclsysGetVersionStr: no package {pkg}"),
            );
        }
        let v = b"0.0.0-emulator\0";
        std::ptr::copy_nonoverlapping(v.as_ptr().cast::<c_char>(), out, v.len());
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetSocName() -> *const c_char {
    let g = lock();
    match g.as_ref() {
        Some(s) if s.initialized => s.config.soc.as_ptr(),
        _ => std::ptr::null(),
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetDeviceCount(count: *mut u32) -> AclError {
    if count.is_null() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclrtGetDeviceCount: null output".into(),
        );
    }
    with_state("aclrtGetDeviceCount", |s| {
        *count = s.config.devices;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtSetDevice(id: i32) -> AclError {
    with_state("aclrtSetDevice", |s| {
        if let Err(code) = s.valid_device(id, "aclrtSetDevice") {
            return code;
        }
        *s.device_refs.entry(id).or_insert(0) += 1;
        let ctx = match s.default_contexts.get(&id) {
            Some(&c) => c,
            None => {
                let c = s.handle();
                s.default_contexts.insert(id, c);
                s.contexts.insert(c, id);
                c
            }
        };
        CURRENT.with(|c| c.set(Some(ctx)));
        s.counters.devices_set += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtResetDevice(id: i32) -> AclError {
    with_state("aclrtResetDevice", |s| {
        if let Err(code) = s.valid_device(id, "aclrtResetDevice") {
            return code;
        }
        let refs = s.device_refs.entry(id).or_insert(0);
        if *refs == 0 {
            s.counters.protocol_errors += 1;
            return fail(
                ACL_ERROR_RT_INVALID_DEVICEID,
                format!("aclrtResetDevice: device {id} was not set"),
            );
        }
        *refs -= 1;
        if *refs == 0 {
            s.device_refs.remove(&id);
            let explicit = s
                .contexts
                .iter()
                .filter(|(c, d)| **d == id && !s.default_contexts.values().any(|x| x == *c))
                .count();
            if explicit > 0 {
                s.counters.protocol_errors += 1;
            }
        }
        s.counters.devices_reset += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtCreateContext(ctx: *mut *mut c_void, id: i32) -> AclError {
    if ctx.is_null() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclrtCreateContext: null output".into(),
        );
    }
    with_state("aclrtCreateContext", |s| {
        if let Err(code) = s.valid_device(id, "aclrtCreateContext") {
            return code;
        }
        let c = s.handle();
        s.contexts.insert(c, id);
        // As in AscendCL, the new context becomes current on the calling thread.
        CURRENT.with(|cur| cur.set(Some(c)));
        *ctx = c as *mut c_void;
        s.counters.contexts_created += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtDestroyContext(ctx: *mut c_void) -> AclError {
    let c = ctx as usize;
    with_state("aclrtDestroyContext", |s| {
        if !s.contexts.contains_key(&c) || s.default_contexts.values().any(|&d| d == c) {
            s.counters.protocol_errors += 1;
            return fail(
                ACL_ERROR_RT_INVALID_HANDLE,
                format!(
                    "aclrtDestroyContext: {c:#x} is not a context created by aclrtCreateContext"
                ),
            );
        }
        let owns =
            s.streams.values().any(|st| st.ctx == c) || s.allocs.values().any(|a| a.ctx == c);
        if owns {
            s.counters.protocol_errors += 1;
        }
        s.contexts.remove(&c);
        CURRENT.with(|cur| {
            if cur.get() == Some(c) {
                cur.set(None);
            }
        });
        s.counters.contexts_destroyed += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtSetCurrentContext(ctx: *mut c_void) -> AclError {
    let c = ctx as usize;
    with_state("aclrtSetCurrentContext", |s| {
        if !s.contexts.contains_key(&c) {
            return fail(
                ACL_ERROR_RT_INVALID_HANDLE,
                format!("aclrtSetCurrentContext: unknown context {c:#x}"),
            );
        }
        CURRENT.with(|cur| cur.set(Some(c)));
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtCreateStream(stream: *mut *mut c_void) -> AclError {
    if stream.is_null() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclrtCreateStream: null output".into(),
        );
    }
    with_state("aclrtCreateStream", |s| {
        let ctx = match s.current("aclrtCreateStream") {
            Ok(c) => c,
            Err(code) => return code,
        };
        let h = s.handle();
        s.streams.insert(
            h,
            StreamState {
                ctx,
                pending: Vec::new(),
            },
        );
        *stream = h as *mut c_void;
        s.counters.streams_created += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtDestroyStream(stream: *mut c_void) -> AclError {
    let h = stream as usize;
    with_state("aclrtDestroyStream", |s| {
        match s.streams.remove(&h) {
            None => {
                s.counters.protocol_errors += 1;
                return fail(
                    ACL_ERROR_RT_INVALID_HANDLE,
                    format!("aclrtDestroyStream: unknown stream {h:#x}"),
                );
            }
            Some(st) if !st.pending.is_empty() => {
                // AscendCL wants a stream synchronized before it is destroyed.
                s.counters.protocol_errors += 1;
            }
            Some(_) => {}
        }
        s.counters.streams_destroyed += 1;
        ACL_SUCCESS
    })
}

#[cfg(not(feature = "hide-symbol"))]
#[no_mangle]
pub unsafe extern "C" fn aclrtSynchronizeStream(stream: *mut c_void) -> AclError {
    let h = stream as usize;
    with_state("aclrtSynchronizeStream", |s| {
        match s.stream_of_current(h, "aclrtSynchronizeStream") {
            Ok(Some(h)) => s.run_pending(h),
            Ok(None) => {}
            Err(code) => return code,
        }
        s.counters.syncs += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMalloc(ptr: *mut *mut c_void, size: usize, _policy: u32) -> AclError {
    if ptr.is_null() || size == 0 {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            format!("aclrtMalloc: null output or size {size}"),
        );
    }
    with_state("aclrtMalloc", |s| {
        let ctx = match s.current("aclrtMalloc") {
            Ok(c) => c,
            Err(code) => return code,
        };
        let device = s.contexts.get(&ctx).copied().unwrap_or(-1);
        let used = s.device_bytes(device);
        if used.saturating_add(size) > s.config.memory {
            return fail(
                ACL_ERROR_RT_MEMORY_ALLOCATION,
                format!(
                    "aclrtMalloc: {size} bytes do not fit in device {device} ({used} of {} in use)",
                    s.config.memory
                ),
            );
        }
        let Ok(layout) = Layout::from_size_align(size, ALIGN) else {
            return fail(ACL_ERROR_INVALID_PARAM, format!("aclrtMalloc: size {size}"));
        };
        let p = alloc(layout);
        if p.is_null() {
            return fail(
                ACL_ERROR_RT_MEMORY_ALLOCATION,
                format!("aclrtMalloc: host allocation of {size} bytes failed"),
            );
        }
        std::ptr::write_bytes(p, POISON, size);
        s.allocs.insert(p as usize, Alloc { size, ctx, device });
        *ptr = p.cast();
        s.counters.mallocs += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtFree(ptr: *mut c_void) -> AclError {
    let base = ptr as usize;
    with_state("aclrtFree", |s| {
        if s.current("aclrtFree").is_err() {
            s.counters.protocol_errors += 1;
        }
        let Some(a) = s.allocs.remove(&base) else {
            s.counters.protocol_errors += 1;
            return fail(
                ACL_ERROR_INVALID_PARAM,
                format!("aclrtFree: {base:#x} is not an allocation of aclrtMalloc"),
            );
        };
        if s.streams
            .values()
            .any(|st| st.pending.iter().any(|t| t.touches.contains(&base)))
        {
            s.counters.protocol_errors += 1;
        }
        if let Ok(layout) = Layout::from_size_align(a.size, ALIGN) {
            dealloc(base as *mut u8, layout);
        }
        s.counters.frees += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtMemcpy(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: u32,
) -> AclError {
    with_state("aclrtMemcpy", |s| {
        if let Err(code) = s.current("aclrtMemcpy") {
            return code;
        }
        if dst.is_null() || src.is_null() || count > dest_max {
            return fail(
                ACL_ERROR_INVALID_PARAM,
                format!("aclrtMemcpy: null pointer or count {count} > destMax {dest_max}"),
            );
        }
        let (dev_dst, dev_src) = match kind {
            ACL_MEMCPY_HOST_TO_HOST => (false, false),
            ACL_MEMCPY_HOST_TO_DEVICE => (true, false),
            ACL_MEMCPY_DEVICE_TO_HOST => (false, true),
            ACL_MEMCPY_DEVICE_TO_DEVICE => (true, true),
            _ => {
                return fail(
                    ACL_ERROR_INVALID_PARAM,
                    format!("aclrtMemcpy: kind {kind} not emulated"),
                )
            }
        };
        if dev_dst && s.find(dst as usize, count).is_none() {
            return fail(
                ACL_ERROR_INVALID_PARAM,
                format!("aclrtMemcpy: destination is not {count} bytes of device memory"),
            );
        }
        if dev_src && s.find(src as usize, count).is_none() {
            return fail(
                ACL_ERROR_INVALID_PARAM,
                format!("aclrtMemcpy: source is not {count} bytes of device memory"),
            );
        }
        std::ptr::copy(src.cast::<u8>(), dst.cast::<u8>(), count);
        s.counters.memcpys += 1;
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclrtGetMemInfo(
    _attr: u32,
    free: *mut usize,
    total: *mut usize,
) -> AclError {
    if free.is_null() || total.is_null() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclrtGetMemInfo: null output".into(),
        );
    }
    with_state("aclrtGetMemInfo", |s| {
        let ctx = match s.current("aclrtGetMemInfo") {
            Ok(c) => c,
            Err(code) => return code,
        };
        let device = s.contexts.get(&ctx).copied().unwrap_or(-1);
        *total = s.config.memory;
        *free = s.config.memory.saturating_sub(s.device_bytes(device));
        ACL_SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn aclopSetModelDir(dir: *const c_char) -> AclError {
    if dir.is_null() {
        return fail(
            ACL_ERROR_INVALID_PARAM,
            "aclopSetModelDir: null path".into(),
        );
    }
    with_state("aclopSetModelDir", |s| {
        s.counters.op_model_dirs += 1;
        ACL_SUCCESS
    })
}

fn dtype_size(dt: c_int) -> Option<usize> {
    match dt {
        ACL_FLOAT => Some(4),
        ACL_FLOAT16 | ACL_BF16 => Some(2),
        _ => None,
    }
}

unsafe fn load(dt: c_int, base: usize, i: usize) -> f32 {
    match dt {
        ACL_FLOAT => *(base as *const f32).add(i),
        ACL_FLOAT16 => f16::from_bits(*(base as *const u16).add(i)).to_f32(),
        _ => bf16::from_bits(*(base as *const u16).add(i)).to_f32(),
    }
}

unsafe fn store(dt: c_int, base: usize, i: usize, v: f32) {
    match dt {
        ACL_FLOAT => *(base as *mut f32).add(i) = v,
        ACL_FLOAT16 => *(base as *mut u16).add(i) = f16::from_f32(v).to_bits(),
        _ => *(base as *mut u16).add(i) = bf16::from_f32(v).to_bits(),
    }
}

/// Row-major `C = alpha·op(A)·op(B) + beta·C` with a sequential f32 sum over k. With
/// `beta == 0`, C is not read (the BLAS convention). The operands are first converted to f32
/// (exact for f16/bf16) with `op(A)` as rows of k and `op(B)` as columns of k, so the loop
/// reads contiguous memory; the sum order is the same.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_host(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: (usize, c_int),
    b: (usize, c_int),
    c: (usize, c_int),
    alpha: f32,
    beta: f32,
) {
    // ar[i*k + p] = op(A)[i, p]; bc[j*k + p] = op(B)[p, j].
    let mut ar = vec![0f32; m * k];
    for i in 0..m {
        for p in 0..k {
            ar[i * k + p] = load(a.1, a.0, if ta { p * m + i } else { i * k + p });
        }
    }
    let mut bc = vec![0f32; n * k];
    for j in 0..n {
        for p in 0..k {
            bc[j * k + p] = load(b.1, b.0, if tb { j * k + p } else { p * n + j });
        }
    }
    for i in 0..m {
        let row = &ar[i * k..(i + 1) * k];
        for j in 0..n {
            let col = &bc[j * k..(j + 1) * k];
            let mut acc = 0f32;
            for (x, y) in row.iter().zip(col) {
                acc += x * y;
            }
            let v = if beta == 0.0 {
                alpha * acc
            } else {
                alpha * acc + beta * load(c.1, c.0, i * n + j)
            };
            store(c.1, c.0, i * n + j, v);
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn aclblasGemmEx(
    trans_a: u32,
    trans_b: u32,
    trans_c: u32,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    lda: c_int,
    type_a: c_int,
    b: *const c_void,
    ldb: c_int,
    type_b: c_int,
    beta: *const c_void,
    c: *mut c_void,
    ldc: c_int,
    type_c: c_int,
    compute: u32,
    stream: *mut c_void,
) -> AclError {
    with_state("aclblasGemmEx", |s| {
        let stream = match s.stream_of_current(stream as usize, "aclblasGemmEx") {
            Ok(st) => st,
            Err(code) => return code,
        };
        let invalid = |msg: String| fail(ACL_ERROR_INVALID_PARAM, format!("aclblasGemmEx: {msg}"));
        if m <= 0 || n <= 0 || k <= 0 {
            return invalid(format!("m, n, k must be > 0 (m={m}, n={n}, k={k})"));
        }
        if lda != -1 || ldb != -1 || ldc != -1 {
            return invalid(format!(
                "lda, ldb, ldc must be -1 (got {lda}, {ldb}, {ldc})"
            ));
        }
        if compute != ACL_COMPUTE_HIGH_PRECISION {
            return invalid("only ACL_COMPUTE_HIGH_PRECISION is supported".into());
        }
        let trans = |t: u32| match t {
            ACL_TRANS_N => Some(false),
            ACL_TRANS_T => Some(true),
            _ => None,
        };
        let (Some(ta), Some(tb), Some(false)) = (trans(trans_a), trans(trans_b), trans(trans_c))
        else {
            return invalid(
                "the emulator supports ACL_TRANS_N/T for A and B, ACL_TRANS_N for C".into(),
            );
        };
        let supported = matches!(
            (type_a, type_b, type_c),
            (ACL_FLOAT16, ACL_FLOAT16, ACL_FLOAT16 | ACL_FLOAT)
                | (ACL_BF16, ACL_BF16, ACL_FLOAT)
                | (ACL_FLOAT, ACL_FLOAT, ACL_FLOAT)
        );
        let (Some(sa), Some(sc)) = (dtype_size(type_a), dtype_size(type_c)) else {
            return fail(
                ACL_ERROR_UNSUPPORTED_DATA_TYPE,
                "aclblasGemmEx: data type".into(),
            );
        };
        if !supported {
            return fail(
                ACL_ERROR_UNSUPPORTED_DATA_TYPE,
                format!("aclblasGemmEx: types A={type_a} B={type_b} C={type_c} not emulated"),
            );
        }
        let (m, n, k) = (m as usize, n as usize, k as usize);
        let mut touches = Vec::new();
        for (name, p, bytes) in [
            ("A", a as usize, m * k * sa),
            ("B", b as usize, k * n * sa),
            ("C", c as usize, m * n * sc),
            ("alpha", alpha as usize, sc),
            ("beta", beta as usize, sc),
        ] {
            match s.find(p, bytes) {
                Some(base) => touches.push(base),
                None => return invalid(format!("{name} is not {bytes} bytes of device memory")),
            }
        }
        let (a, b, c, alpha, beta) = (
            a as usize,
            b as usize,
            c as usize,
            alpha as usize,
            beta as usize,
        );
        let run = move || {
            // SAFETY (emulator): every operand was checked to lie in an allocation that is
            // still live when the task runs (run_pending checks `touches`).
            unsafe {
                let al = load(type_c, alpha, 0);
                let be = load(type_c, beta, 0);
                gemm_host(
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    (a, type_a),
                    (b, type_b),
                    (c, type_c),
                    al,
                    be,
                );
            }
        };
        s.counters.gemms_enqueued += 1;
        match stream {
            Some(h) => {
                if let Some(st) = s.streams.get_mut(&h) {
                    st.pending.push(Task {
                        touches,
                        run: Box::new(run),
                    });
                }
            }
            None => {
                // The default stream: runs now.
                run();
                s.counters.gemms_run += 1;
            }
        }
        ACL_SUCCESS
    })
}
