//! The safe layer: runtime (init/finalize), device + context, stream, device memory, GEMM.

use std::ffi::{c_char, c_void, CStr, CString};
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard};

use half::{bf16, f16};

use crate::error::AclError;
use crate::loader::SearchEnv;
use crate::sys;
use crate::Result;

/// The live runtime of this process and how many [`Runtime`] handles exist: `aclInit` runs
/// once however many handles exist, `aclFinalize` when the last one drops. Counted under one
/// lock (not through `Arc` counts) so a load racing with the last drop sees either the live
/// runtime or a finalized one, never a runtime being finalized.
static LIVE: Mutex<Registry> = Mutex::new(Registry {
    shared: None,
    handles: 0,
});

struct Registry {
    shared: Option<Arc<Shared>>,
    handles: usize,
}

/// A poisoned lock only means another thread panicked while holding it; the data (a handle
/// or a cache slot) is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens a library and keeps it loaded for the life of the process: CANN starts threads and
/// registers destructors, and is not made to be unloaded mid-process.
fn open_library(path: &Path) -> Result<libloading::Library> {
    // SAFETY: loading runs the library's initializers; that is what opening AscendCL means.
    unsafe { libloading::Library::new(path) }.map_err(|e| AclError::Load {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Returns `MissingSymbol` for the first listed field of `$lib` whose symbol did not resolve.
macro_rules! require {
    ($lib:expr, $path:expr, [$($f:ident),* $(,)?]) => {
        $(
            if $lib.$f.is_err() {
                return Err(AclError::MissingSymbol { symbol: stringify!($f), path: $path.to_owned() });
            }
        )*
    };
}

struct Shared {
    acl: ManuallyDrop<sys::AscendCl>,
    path: PathBuf,
    search: SearchEnv,
    blas: Mutex<Option<Arc<Blas>>>,
}

struct Blas {
    lib: ManuallyDrop<sys::AclCblas>,
    path: PathBuf,
}

impl Shared {
    /// `aclGetRecentErrMsg()`, when the runtime has one (it is thread-local in AscendCL, so
    /// this runs on the thread of the failed call).
    fn recent_message(&self) -> Option<String> {
        recent_message(&self.acl)
    }

    fn check(
        &self,
        code: sys::aclError,
        call: &'static str,
        context: impl FnOnce() -> String,
    ) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        Err(AclError::Call {
            call,
            context: context(),
            code,
            recent: self.recent_message(),
        })
    }
}

fn recent_message(acl: &sys::AscendCl) -> Option<String> {
    let f = acl.aclGetRecentErrMsg.as_ref().ok()?;
    // SAFETY: the function takes no argument and returns a NUL-terminated string or null.
    let p = unsafe { f() };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated, owned by the runtime until the next call.
    let s = unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim()
        .to_owned();
    (!s.is_empty()).then_some(s)
}

/// A loaded, initialized AscendCL runtime. Cheap to clone; the process shares one.
pub struct Runtime {
    shared: Arc<Shared>,
}

impl Clone for Runtime {
    fn clone(&self) -> Self {
        lock(&LIVE).handles += 1;
        Runtime {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let mut live = lock(&LIVE);
        live.handles = live.handles.saturating_sub(1);
        if live.handles > 0 {
            return;
        }
        live.shared = None;
        // SAFETY: the last handle; every Device/Stream/DeviceBuffer holds one, so none is left.
        // Under the lock, so no load can aclInit before this finalizes.
        let code = unsafe { self.shared.acl.aclFinalize() };
        if code != 0 {
            tracing::warn!(
                "{}",
                AclError::Call {
                    call: "aclFinalize",
                    context: String::new(),
                    code,
                    recent: self.shared.recent_message(),
                }
            );
        }
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("path", &self.shared.path)
            .finish()
    }
}

impl Runtime {
    /// The runtime found through the process environment (see [`crate::loader`]).
    pub fn load() -> Result<Runtime> {
        Self::load_with(&SearchEnv::from_env())
    }

    /// The runtime found through `env`. While a runtime is live in this process, it is returned
    /// (an error if `env` points at another library).
    pub fn load_with(env: &SearchEnv) -> Result<Runtime> {
        let mut live = lock(&LIVE);
        let path = env.locate_runtime()?;
        if let Some(shared) = &live.shared {
            if shared.path != path {
                return Err(AclError::invalid(
                    "Runtime::load",
                    format!(
                        "{} is already loaded in this process; cannot also load {}",
                        shared.path.display(),
                        path.display()
                    ),
                ));
            }
            let shared = shared.clone();
            live.handles += 1;
            return Ok(Runtime { shared });
        }
        let lib = open_library(&path)?;
        // SAFETY: resolving symbols has no side effects; missing ones are checked below.
        let acl = unsafe { sys::AscendCl::from_library(lib) }.map_err(|e| AclError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let acl = ManuallyDrop::new(acl);
        // The optional ones (aclGetRecentErrMsg, aclrtGetSocName, aclrtGetVersion,
        // aclsysGetVersionStr, aclopSetModelDir) are checked where they are used.
        require!(
            acl,
            path,
            [
                aclInit,
                aclFinalize,
                aclrtGetDeviceCount,
                aclrtSetDevice,
                aclrtResetDevice,
                aclrtCreateContext,
                aclrtDestroyContext,
                aclrtSetCurrentContext,
                aclrtCreateStream,
                aclrtDestroyStream,
                aclrtSynchronizeStream,
                aclrtMalloc,
                aclrtFree,
                aclrtMemcpy,
                aclrtGetMemInfo,
            ]
        );
        // SAFETY: a null config path means "no configuration file".
        let code = unsafe { acl.aclInit(ptr::null()) };
        if code != 0 {
            return Err(AclError::Call {
                call: "aclInit",
                context: String::new(),
                code,
                recent: recent_message(&acl),
            });
        }
        let shared = Arc::new(Shared {
            acl,
            path,
            search: env.clone(),
            blas: Mutex::new(None),
        });
        live.shared = Some(shared.clone());
        live.handles = 1;
        Ok(Runtime { shared })
    }

    /// The `libascendcl.so` that was loaded.
    pub fn library_path(&self) -> &Path {
        &self.shared.path
    }

    /// The raw bindings, for calls the safe layer does not wrap yet.
    pub fn sys(&self) -> &sys::AscendCl {
        &self.shared.acl
    }

    /// NPUs visible to this process (AscendCL applies `ASCEND_RT_VISIBLE_DEVICES`).
    pub fn device_count(&self) -> Result<u32> {
        let mut n = 0u32;
        // SAFETY: writes one u32.
        let code = unsafe { self.shared.acl.aclrtGetDeviceCount(&mut n) };
        self.shared
            .check(code, "aclrtGetDeviceCount", String::new)?;
        Ok(n)
    }

    /// The SoC name (e.g. `Ascend910B4`), if the runtime reports one.
    pub fn soc_name(&self) -> Option<String> {
        let f = self.shared.acl.aclrtGetSocName.as_ref().ok()?;
        // SAFETY: no argument; returns a NUL-terminated string or null.
        let p = unsafe { f() };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// The version of the installed CANN runtime package (`aclsysGetVersionStr("runtime")`,
    /// as in its `version.info`), if the library has that call and knows the package.
    pub fn cann_version(&self) -> Option<String> {
        let f = self.shared.acl.aclsysGetVersionStr.as_ref().ok()?;
        let mut pkg = *b"runtime\0";
        let mut buf = [0 as c_char; sys::ACL_PKG_VERSION_MAX_SIZE as usize];
        // SAFETY: pkg is NUL-terminated; buf has the documented ACL_PKG_VERSION_MAX_SIZE.
        let code = unsafe { f(pkg.as_mut_ptr().cast(), buf.as_mut_ptr()) };
        if code != 0 {
            return None;
        }
        // The runtime writes a NUL-terminated string; never read past the buffer.
        let bytes: Vec<u8> = buf
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Some(String::from_utf8_lossy(&bytes).into_owned()).filter(|s| !s.is_empty())
    }

    /// The AscendCL interface version (`aclrtGetVersion`), if the library has that call.
    pub fn acl_version(&self) -> Option<(i32, i32, i32)> {
        let f = self.shared.acl.aclrtGetVersion.as_ref().ok()?;
        let (mut a, mut b, mut c) = (0, 0, 0);
        // SAFETY: writes three i32.
        (unsafe { f(&mut a, &mut b, &mut c) } == 0).then_some((a, b, c))
    }

    /// Where single-operator models (`.om`, e.g. the GEMM that `aclblasGemmEx` executes) are
    /// loaded from (`aclopSetModelDir`).
    pub fn set_op_model_dir(&self, dir: &Path) -> Result<()> {
        let f = self
            .shared
            .acl
            .aclopSetModelDir
            .as_ref()
            .map_err(|_| AclError::MissingSymbol {
                symbol: "aclopSetModelDir",
                path: self.shared.path.clone(),
            })?;
        let c = path_cstring(dir, "set_op_model_dir")?;
        // SAFETY: NUL-terminated path.
        let code = unsafe { f(c.as_ptr()) };
        self.shared
            .check(code, "aclopSetModelDir", || dir.display().to_string())
    }

    /// Loads `libacl_cblas.so` (beside `libascendcl.so` first) if not done yet; returns its
    /// path. [`Stream::gemm`] does this on first use; call it up front to fail early.
    pub fn load_blas(&self) -> Result<PathBuf> {
        Ok(self.blas()?.path.clone())
    }

    fn blas(&self) -> Result<Arc<Blas>> {
        let mut slot = lock(&self.shared.blas);
        if let Some(b) = &*slot {
            return Ok(b.clone());
        }
        let path = self.shared.search.locate_cblas(&self.shared.path)?;
        let lib = open_library(&path)?;
        // SAFETY: resolving symbols has no side effects; checked below.
        let cblas = unsafe { sys::AclCblas::from_library(lib) }.map_err(|e| AclError::Load {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let cblas = ManuallyDrop::new(cblas);
        require!(cblas, path, [aclblasGemmEx]);
        let b = Arc::new(Blas { lib: cblas, path });
        *slot = Some(b.clone());
        Ok(b)
    }

    /// Selects NPU `id` (`aclrtSetDevice`) and creates a context on it; both are released
    /// when the last clone of the returned [`Device`] and of everything made from it drops.
    pub fn open_device(&self, id: u32) -> Result<Device> {
        let raw_id = i32::try_from(id)
            .map_err(|_| AclError::invalid("open_device", format!("device id {id} too large")))?;
        let acl = &self.shared.acl;
        // SAFETY: plain id.
        let code = unsafe { acl.aclrtSetDevice(raw_id) };
        self.shared
            .check(code, "aclrtSetDevice", || format!("device {id}"))?;
        let mut ctx: sys::aclrtContext = ptr::null_mut();
        // SAFETY: writes one handle.
        let code = unsafe { acl.aclrtCreateContext(&mut ctx, raw_id) };
        if let Err(e) = self
            .shared
            .check(code, "aclrtCreateContext", || format!("device {id}"))
        {
            // SAFETY: balances the aclrtSetDevice above.
            unsafe { acl.aclrtResetDevice(raw_id) };
            return Err(e);
        }
        Ok(Device {
            shared: Arc::new(DeviceShared {
                rt: self.clone(),
                id,
                ctx,
            }),
        })
    }
}

fn path_cstring(p: &Path, op: &'static str) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| AclError::invalid(op, format!("{} contains a NUL byte", p.display())))
}

struct DeviceShared {
    rt: Runtime,
    id: u32,
    ctx: sys::aclrtContext,
}

// SAFETY: an AscendCL context is a process-wide handle; any thread may make it current
// (which every call here does first) or destroy it.
unsafe impl Send for DeviceShared {}
// SAFETY: as above; no method mutates the handle.
unsafe impl Sync for DeviceShared {}

impl DeviceShared {
    /// Makes this device's context current on the calling thread.
    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is live until drop.
        let code = unsafe { self.rt.shared.acl.aclrtSetCurrentContext(self.ctx) };
        self.rt.shared.check(code, "aclrtSetCurrentContext", || {
            format!("device {}", self.id)
        })
    }

    fn check(&self, code: sys::aclError, call: &'static str, what: &str) -> Result<()> {
        self.rt.shared.check(code, call, || {
            if what.is_empty() {
                format!("device {}", self.id)
            } else {
                format!("{what}, device {}", self.id)
            }
        })
    }

    fn warn_on_drop(&self, code: sys::aclError, call: &'static str) {
        if let Err(e) = self.check(code, call, "") {
            tracing::warn!("{e}");
        }
    }
}

impl Drop for DeviceShared {
    fn drop(&mut self) {
        let acl = &self.rt.shared.acl;
        // SAFETY: every stream and buffer of this context holds a Device, so none is left.
        let code = unsafe { acl.aclrtDestroyContext(self.ctx) };
        self.warn_on_drop(code, "aclrtDestroyContext");
        // SAFETY: balances the aclrtSetDevice of open_device.
        let code = unsafe { acl.aclrtResetDevice(self.id as i32) };
        self.warn_on_drop(code, "aclrtResetDevice");
    }
}

/// Device memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// Free.
    pub free: usize,
    /// Total.
    pub total: usize,
}

/// One NPU with its own context. Cheap to clone; released when the last clone, and every
/// stream and buffer made from it, drops.
#[derive(Clone)]
pub struct Device {
    shared: Arc<DeviceShared>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl Device {
    /// The device id.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The runtime it belongs to.
    pub fn runtime(&self) -> &Runtime {
        &self.shared.rt
    }

    fn same(&self, other: &Device) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Free and total device memory (HBM; DDR on devices without HBM).
    pub fn mem_info(&self) -> Result<MemInfo> {
        self.shared.bind()?;
        let acl = &self.shared.rt.shared.acl;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two usize.
        let code = unsafe { acl.aclrtGetMemInfo(sys::ACL_HBM_MEM, &mut free, &mut total) };
        self.shared.check(code, "aclrtGetMemInfo", "HBM")?;
        if total == 0 {
            // SAFETY: as above.
            let code = unsafe { acl.aclrtGetMemInfo(sys::ACL_DDR_MEM, &mut free, &mut total) };
            self.shared.check(code, "aclrtGetMemInfo", "DDR")?;
        }
        Ok(MemInfo { free, total })
    }

    /// A new stream on this device.
    pub fn create_stream(&self) -> Result<Stream> {
        self.shared.bind()?;
        let mut raw: sys::aclrtStream = ptr::null_mut();
        // SAFETY: writes one handle.
        let code = unsafe { self.shared.rt.shared.acl.aclrtCreateStream(&mut raw) };
        self.shared.check(code, "aclrtCreateStream", "")?;
        Ok(Stream {
            dev: self.clone(),
            raw,
            scalars: None,
        })
    }

    /// `len` uninitialized elements of device memory.
    pub fn alloc<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                AclError::invalid(
                    "alloc",
                    format!("cannot allocate {len} elements of {}", T::DTYPE.name()),
                )
            })?;
        self.shared.bind()?;
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: writes one pointer.
        let code = unsafe {
            self.shared
                .rt
                .shared
                .acl
                .aclrtMalloc(&mut p, bytes, sys::ACL_MEM_MALLOC_HUGE_FIRST)
        };
        self.shared
            .check(code, "aclrtMalloc", &format!("{bytes} bytes"))?;
        if p.is_null() {
            return Err(AclError::invalid(
                "alloc",
                format!("aclrtMalloc of {bytes} bytes returned success and a null pointer"),
            ));
        }
        Ok(DeviceBuffer {
            dev: self.clone(),
            ptr: p,
            len,
            _t: PhantomData,
        })
    }

    /// A device copy of `host`.
    pub fn upload<T: Element>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc(host.len())?;
        b.copy_from_host(host)?;
        Ok(b)
    }
}

/// Element types of device buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// f32.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// i8.
    I8,
    /// i32.
    I32,
}

impl DataType {
    /// The `aclDataType` value.
    pub fn raw(self) -> sys::aclDataType {
        match self {
            DataType::F32 => sys::ACL_FLOAT,
            DataType::F16 => sys::ACL_FLOAT16,
            DataType::Bf16 => sys::ACL_BF16,
            DataType::I8 => sys::ACL_INT8,
            DataType::I32 => sys::ACL_INT32,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            DataType::F32 => "f32",
            DataType::F16 => "f16",
            DataType::Bf16 => "bf16",
            DataType::I8 => "i8",
            DataType::I32 => "i32",
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A plain value type device buffers hold (copied bytewise to and from the device).
pub trait Element: Copy + Default + Send + Sync + 'static + sealed::Sealed {
    /// Its `aclDataType`.
    const DTYPE: DataType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {
        $(
            impl sealed::Sealed for $t {}
            impl Element for $t {
                const DTYPE: DataType = DataType::$d;
            }
        )*
    };
}
element!(f32 => F32, f16 => F16, bf16 => Bf16, i8 => I8, i32 => I32);

/// Input types [`Stream::gemm`] accepts (f32 output, f32 accumulation).
pub trait GemmInput: Element {}
impl GemmInput for f32 {}
impl GemmInput for f16 {}
impl GemmInput for bf16 {}

/// Device memory of `len` elements of `T`; freed on drop.
pub struct DeviceBuffer<T: Element> {
    dev: Device,
    ptr: *mut c_void,
    len: usize,
    _t: PhantomData<T>,
}

// SAFETY: the pointer is a device address, only ever passed to AscendCL calls, which bind the
// owning context first.
unsafe impl<T: Element> Send for DeviceBuffer<T> {}
// SAFETY: `&self` methods only read device memory.
unsafe impl<T: Element> Sync for DeviceBuffer<T> {}

impl<T: Element> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("device", &self.dev.id())
            .field("dtype", &T::DTYPE)
            .field("len", &self.len)
            .finish()
    }
}

impl<T: Element> DeviceBuffer<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (zero-length buffers are refused); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes.
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The device address, for AscendCL calls the safe layer does not wrap.
    pub fn as_raw(&self) -> *mut c_void {
        self.ptr
    }

    fn check_len(&self, op: &'static str, n: usize) -> Result<()> {
        if n == self.len {
            Ok(())
        } else {
            Err(AclError::invalid(
                op,
                format!(
                    "host slice has {n} elements, the device buffer {}",
                    self.len
                ),
            ))
        }
    }

    /// Host → device, the whole buffer (synchronous).
    pub fn copy_from_host(&mut self, src: &[T]) -> Result<()> {
        self.check_len("copy_from_host", src.len())?;
        let d = &self.dev.shared;
        d.bind()?;
        let bytes = self.bytes();
        // SAFETY: src has `bytes` bytes; the buffer too.
        let code = unsafe {
            d.rt.shared.acl.aclrtMemcpy(
                self.ptr,
                bytes,
                src.as_ptr().cast(),
                bytes,
                sys::ACL_MEMCPY_HOST_TO_DEVICE,
            )
        };
        d.check(
            code,
            "aclrtMemcpy",
            &format!("{bytes} bytes host to device"),
        )
    }

    /// Device → host, the whole buffer (synchronous; synchronize the stream that wrote it
    /// first).
    pub fn copy_to_host(&self, dst: &mut [T]) -> Result<()> {
        self.check_len("copy_to_host", dst.len())?;
        let d = &self.dev.shared;
        d.bind()?;
        let bytes = self.bytes();
        // SAFETY: dst has `bytes` bytes; the buffer too.
        let code = unsafe {
            d.rt.shared.acl.aclrtMemcpy(
                dst.as_mut_ptr().cast(),
                bytes,
                self.ptr,
                bytes,
                sys::ACL_MEMCPY_DEVICE_TO_HOST,
            )
        };
        d.check(
            code,
            "aclrtMemcpy",
            &format!("{bytes} bytes device to host"),
        )
    }

    /// The buffer's contents on the host.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.len];
        self.copy_to_host(&mut v)?;
        Ok(v)
    }
}

impl<T: Element> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        let d = &self.dev.shared;
        if let Err(e) = d.bind() {
            tracing::warn!("{e}");
        }
        // SAFETY: allocated by aclrtMalloc, freed once.
        let code = unsafe { d.rt.shared.acl.aclrtFree(self.ptr) };
        d.warn_on_drop(code, "aclrtFree");
    }
}

/// Whether a GEMM operand is used as stored or transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trans {
    /// As stored.
    N,
    /// Transposed.
    T,
}

impl Trans {
    fn raw(self) -> sys::aclTransType {
        match self {
            Trans::N => sys::ACL_TRANS_N,
            Trans::T => sys::ACL_TRANS_T,
        }
    }
}

/// Shape of `c[m,n] = op(a)[m,k] · op(b)[k,n]`, all row-major: `a` is stored `[m,k]` (`N`) or
/// `[k,m]` (`T`), `b` is stored `[k,n]` (`N`) or `[n,k]` (`T`). A linear layer
/// `x[m,k] · w[n,k]ᵀ` is `trans_a = N, trans_b = T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDims {
    /// Rows of the result.
    pub m: usize,
    /// Columns of the result.
    pub n: usize,
    /// The reduced dimension.
    pub k: usize,
    /// How `a` is stored.
    pub trans_a: Trans,
    /// How `b` is stored.
    pub trans_b: Trans,
}

/// A stream: work enqueued on it runs in order; [`Stream::synchronize`] waits for it.
/// Destroyed (after a final synchronize) on drop.
pub struct Stream {
    dev: Device,
    raw: sys::aclrtStream,
    /// `[alpha, beta]` in device memory (aclblasGemmEx reads them there) and their bits.
    scalars: Option<(DeviceBuffer<f32>, [u32; 2])>,
}

// SAFETY: a stream handle may be used from any thread with its context current (every call
// binds it first); `&mut self` methods keep one user at a time.
unsafe impl Send for Stream {}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("device", &self.dev.id())
            .finish()
    }
}

impl Stream {
    /// The device it belongs to.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The raw handle, for AscendCL calls the safe layer does not wrap.
    pub fn as_raw(&self) -> sys::aclrtStream {
        self.raw
    }

    /// Waits until everything enqueued has run.
    pub fn synchronize(&self) -> Result<()> {
        let d = &self.dev.shared;
        d.bind()?;
        // SAFETY: live stream.
        let code = unsafe { d.rt.shared.acl.aclrtSynchronizeStream(self.raw) };
        d.check(code, "aclrtSynchronizeStream", "")
    }

    /// Enqueues `c = alpha · op(a) · op(b) + beta · c` through `aclblasGemmEx`, with f32
    /// output and f32 accumulation (`ACL_COMPUTE_HIGH_PRECISION`). Synchronize before reading
    /// `c`. CANN documents f16 inputs for this call; bf16 and f32 inputs are passed through and
    /// a runtime that refuses them fails with its own error code.
    pub fn gemm<T: GemmInput>(
        &mut self,
        dims: GemmDims,
        alpha: f32,
        a: &DeviceBuffer<T>,
        b: &DeviceBuffer<T>,
        beta: f32,
        c: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let GemmDims { m, n, k, .. } = dims;
        let shape = format!("m={m}, n={n}, k={k}, {}", T::DTYPE.name());
        let dim = |v: usize| -> Result<i32> {
            i32::try_from(v).ok().filter(|&x| x > 0).ok_or_else(|| {
                AclError::invalid("gemm", format!("{shape}: dimensions must be 1..=i32::MAX"))
            })
        };
        let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
        for (name, buf_len, rows, cols) in [
            ("a", a.len(), m, k),
            ("b", b.len(), k, n),
            ("c", c.len(), m, n),
        ] {
            if rows.checked_mul(cols) != Some(buf_len) {
                return Err(AclError::invalid(
                    "gemm",
                    format!("{shape}: {name} has {buf_len} elements, expected {rows}×{cols}"),
                ));
            }
        }
        if !(a.dev.same(&self.dev) && b.dev.same(&self.dev) && c.dev.same(&self.dev)) {
            return Err(AclError::invalid(
                "gemm",
                "a, b, c and the stream must belong to the same Device",
            ));
        }
        let blas = self.dev.runtime().blas()?;
        let scalars = self.scalars(alpha, beta)?;
        let d = &self.dev.shared;
        d.bind()?;
        // SAFETY: shapes checked against the buffers above; alpha and beta are f32 (C's type)
        // in device memory; lda/ldb/ldc must be -1 (reserved by CANN).
        let code = unsafe {
            blas.lib.aclblasGemmEx(
                dims.trans_a.raw(),
                dims.trans_b.raw(),
                sys::ACL_TRANS_N,
                mi,
                ni,
                ki,
                scalars,
                a.ptr,
                -1,
                T::DTYPE.raw(),
                b.ptr,
                -1,
                T::DTYPE.raw(),
                scalars.cast::<f32>().add(1).cast(),
                c.ptr,
                -1,
                sys::ACL_FLOAT,
                sys::ACL_COMPUTE_HIGH_PRECISION,
                self.raw,
            )
        };
        d.check(code, "aclblasGemmEx", &shape)
    }

    /// The device address of `[alpha, beta]`, uploaded when they change.
    fn scalars(&mut self, alpha: f32, beta: f32) -> Result<*const c_void> {
        let bits = [alpha.to_bits(), beta.to_bits()];
        match &mut self.scalars {
            Some((buf, cached)) if *cached == bits => Ok(buf.as_raw()),
            Some((buf, cached)) => {
                // Work already enqueued may still read the old values.
                let d = &self.dev.shared;
                d.bind()?;
                // SAFETY: live stream.
                let code = unsafe { d.rt.shared.acl.aclrtSynchronizeStream(self.raw) };
                d.check(code, "aclrtSynchronizeStream", "")?;
                buf.copy_from_host(&[alpha, beta])?;
                *cached = bits;
                Ok(buf.as_raw())
            }
            None => {
                let buf = self.dev.upload(&[alpha, beta])?;
                let p = buf.as_raw();
                self.scalars = Some((buf, bits));
                Ok(p)
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let d = &self.dev.shared;
        if let Err(e) = d.bind() {
            tracing::warn!("{e}");
        }
        let acl = &d.rt.shared.acl;
        // SAFETY: live stream; AscendCL wants it idle before it is destroyed.
        let code = unsafe { acl.aclrtSynchronizeStream(self.raw) };
        d.warn_on_drop(code, "aclrtSynchronizeStream");
        // SAFETY: destroyed once; the scalars buffer (which holds its own Device) is freed
        // after it.
        let code = unsafe { acl.aclrtDestroyStream(self.raw) };
        d.warn_on_drop(code, "aclrtDestroyStream");
    }
}
