//! [`AscendDevice`]: one Ascend NPU behind the [`Device`] trait.
//!
//! What runs where (docs/ASCEND.md has the table):
//! * `matmul_t` (every linear layer) and `xtx_accumulate` (the Hessian `XᵀX` of GPTQ-style
//!   statistics) run on the NPU through `aclblasGemmEx`: inputs converted on the host to the
//!   chosen [`GemmPrecision`] (f16 by default, the type CANN documents for this call), f32
//!   accumulation and f32 output, copied back synchronously.
//! * Everything else (RMSNorm, RoPE, attention with its softmax, SwiGLU, residual adds, bias
//!   adds, the f64 `XᵀX`) runs on the CPU ([`CpuDevice`]): AscendCL's single-operator API for
//!   them needs compiled operator models or `aclnn*` kernels this crate does not bind yet.
//!   Those calls are counted in [`TransferStats::host_ops`].
//!
//! Operands live on the NPU only for the duration of one call: weights are uploaded with every
//! GEMM (a content-addressed cache would be unsound: plugins reuse one buffer for successive
//! candidate weights). Device buffers are pooled by length, so a run allocates a handful of
//! them, not one per call. Every byte copied is counted ([`AscendDevice::stats`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use ascendcl_sys::{AclError, DeviceBuffer, Element, GemmDims, GemmInput, Runtime, Stream, Trans};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{check_matmul_t, check_xtx, AttnShape, CpuDevice, Device, DeviceError};

/// The element type the GEMM inputs are converted to before they go to the NPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPrecision {
    /// IEEE half: what CANN documents for `aclblasGemmEx` (f16 in, f32 out). Values beyond
    /// ±65504 are refused with an error rather than silently becoming infinite.
    #[default]
    F16,
    /// bfloat16: f32's range, 8 bits of mantissa (not in CANN's list for this call; checked
    /// on first use by the runtime).
    Bf16,
    /// f32 inputs (not in CANN's list for this call; the emulator accepts it).
    F32,
}

impl GemmPrecision {
    /// Every value, in documentation order.
    pub const ALL: [GemmPrecision; 3] =
        [GemmPrecision::F16, GemmPrecision::Bf16, GemmPrecision::F32];

    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            GemmPrecision::F16 => "f16",
            GemmPrecision::Bf16 => "bf16",
            GemmPrecision::F32 => "f32",
        }
    }
}

/// What an [`AscendDevice`] did: copies, GEMMs and the ops it left to the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferStats {
    /// Host → device copies and their bytes.
    pub h2d_copies: u64,
    pub h2d_bytes: u64,
    /// Device → host copies and their bytes.
    pub d2h_copies: u64,
    pub d2h_bytes: u64,
    /// `aclblasGemmEx` calls.
    pub gemms: u64,
    /// Device allocations (`aclrtMalloc`; the pool reuses buffers).
    pub allocations: u64,
    /// Calls of the [`Device`] trait that ran on the CPU.
    pub host_ops: u64,
}

#[derive(Default)]
struct Counters {
    h2d_copies: AtomicU64,
    h2d_bytes: AtomicU64,
    d2h_copies: AtomicU64,
    d2h_bytes: AtomicU64,
    gemms: AtomicU64,
    allocations: AtomicU64,
    host_ops: AtomicU64,
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// Free device buffers by length.
struct Pool<T: Element> {
    free: HashMap<usize, Vec<DeviceBuffer<T>>>,
    bytes: usize,
}

impl<T: Element> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            free: HashMap::new(),
            bytes: 0,
        }
    }
}

/// Pooled bytes (per element type) above which returned buffers are freed instead of kept
/// (shapes of one model repeat, so the pool normally holds a few buffers per linear shape).
const POOL_BUDGET: usize = 4 << 30;

impl<T: Element> Pool<T> {
    fn take(
        &mut self,
        dev: &ascendcl_sys::Device,
        len: usize,
        counters: &Counters,
    ) -> Result<DeviceBuffer<T>, AclError> {
        if let Some(b) = self.free.get_mut(&len).and_then(Vec::pop) {
            self.bytes -= b.bytes();
            return Ok(b);
        }
        bump(&counters.allocations, 1);
        dev.alloc(len)
    }

    fn give(&mut self, b: DeviceBuffer<T>) {
        if self.bytes + b.bytes() > POOL_BUDGET {
            return;
        }
        self.bytes += b.bytes();
        self.free.entry(b.len()).or_default().push(b);
    }
}

/// Types the GEMM inputs are converted to on the host.
trait Input: GemmInput {
    fn pool(p: &mut Pools) -> &mut Pool<Self>;
    fn convert(src: &[f32], dst: &mut Vec<Self>);
}

impl Input for f16 {
    fn pool(p: &mut Pools) -> &mut Pool<Self> {
        &mut p.f16
    }
    fn convert(src: &[f32], dst: &mut Vec<Self>) {
        dst.clear();
        dst.resize(src.len(), f16::ZERO);
        dst.convert_from_f32_slice(src);
    }
}

impl Input for bf16 {
    fn pool(p: &mut Pools) -> &mut Pool<Self> {
        &mut p.bf16
    }
    fn convert(src: &[f32], dst: &mut Vec<Self>) {
        dst.clear();
        dst.resize(src.len(), bf16::ZERO);
        dst.convert_from_f32_slice(src);
    }
}

impl Input for f32 {
    fn pool(p: &mut Pools) -> &mut Pool<Self> {
        &mut p.f32
    }
    fn convert(src: &[f32], dst: &mut Vec<Self>) {
        dst.clear();
        dst.extend_from_slice(src);
    }
}

#[derive(Default)]
struct Pools {
    f16: Pool<f16>,
    bf16: Pool<bf16>,
    f32: Pool<f32>,
}

/// What one GEMM call needs under the device's lock.
struct Inner {
    stream: Stream,
    pools: Pools,
}

/// One NPU (`ascend:<id>`): the GEMMs of the forward pass and of the statistics on the NPU,
/// the other ops on the CPU. Calls are serialized per device (one stream); use one
/// `AscendDevice` per NPU to run several in parallel.
pub struct AscendDevice {
    label: String,
    device: ascendcl_sys::Device,
    precision: GemmPrecision,
    cpu: CpuDevice,
    inner: Mutex<Inner>,
    counters: Counters,
}

impl std::fmt::Debug for AscendDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AscendDevice")
            .field("label", &self.label)
            .field("precision", &self.precision)
            .finish()
    }
}

/// The largest finite f16.
const F16_MAX: f32 = 65504.0;

impl AscendDevice {
    /// Opens NPU `id` of `runtime` (an id as the runtime numbers them, after
    /// `ASCEND_RT_VISIBLE_DEVICES`), creates its stream and loads `libacl_cblas.so`, so a
    /// missing library or symbol fails here rather than at the first GEMM.
    pub fn open(
        runtime: &Runtime,
        id: u32,
        precision: GemmPrecision,
    ) -> Result<AscendDevice, AclError> {
        let visible = runtime.device_count()?;
        if id >= visible {
            return Err(AclError::Invalid {
                op: "AscendDevice::open",
                message: format!(
                    "NPU {id} requested but the runtime sees {visible} NPU(s) (ids 0..{visible}, \
                     after ASCEND_RT_VISIBLE_DEVICES={})",
                    std::env::var("ASCEND_RT_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into())
                ),
            });
        }
        runtime.load_blas()?;
        let device = runtime.open_device(id)?;
        let stream = device.create_stream()?;
        Ok(AscendDevice {
            label: format!("ascend:{id}"),
            device,
            precision,
            cpu: CpuDevice::new(),
            inner: Mutex::new(Inner {
                stream,
                pools: Pools::default(),
            }),
            counters: Counters::default(),
        })
    }

    /// The NPU id.
    pub fn id(&self) -> u32 {
        self.device.id()
    }

    /// The GEMM input type.
    pub fn precision(&self) -> GemmPrecision {
        self.precision
    }

    /// Copies, GEMMs and host ops so far.
    pub fn stats(&self) -> TransferStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransferStats {
            h2d_copies: get(&c.h2d_copies),
            h2d_bytes: get(&c.h2d_bytes),
            d2h_copies: get(&c.d2h_copies),
            d2h_bytes: get(&c.d2h_bytes),
            gemms: get(&c.gemms),
            allocations: get(&c.allocations),
            host_ops: get(&c.host_ops),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves at worst a buffer out of the pool.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn backend(&self, op: &'static str, e: AclError) -> DeviceError {
        DeviceError::Backend {
            op,
            device: self.label.clone(),
            message: e.to_string(),
        }
    }

    fn host_op(&self) -> &CpuDevice {
        bump(&self.counters.host_ops, 1);
        &self.cpu
    }

    /// Refuses f16 inputs that would overflow to infinity.
    fn check_range(&self, op: &'static str, operand: &str, v: &[f32]) -> Result<(), DeviceError> {
        if self.precision != GemmPrecision::F16 {
            return Ok(());
        }
        match v.iter().find(|x| x.is_finite() && x.abs() > F16_MAX) {
            None => Ok(()),
            Some(x) => Err(DeviceError::Backend {
                op,
                device: self.label.clone(),
                message: format!(
                    "{operand} holds {x}, beyond the f16 range (±{F16_MAX}) of the NPU GEMM \
                     inputs; set [device] precision = \"bf16\" (or \"f32\") in the manifest"
                ),
            }),
        }
    }

    /// `c[dims.m, dims.n] = op(a) · op(b)` on the NPU; `b = None` multiplies `a` with itself.
    fn gemm(
        &self,
        dims: GemmDims,
        a: &[f32],
        b: Option<&[f32]>,
        c: &mut [f32],
    ) -> Result<(), AclError> {
        match self.precision {
            GemmPrecision::F16 => self.gemm_as::<f16>(dims, a, b, c),
            GemmPrecision::Bf16 => self.gemm_as::<bf16>(dims, a, b, c),
            GemmPrecision::F32 => self.gemm_as::<f32>(dims, a, b, c),
        }
    }

    fn gemm_as<T: Input>(
        &self,
        dims: GemmDims,
        a: &[f32],
        b: Option<&[f32]>,
        c: &mut [f32],
    ) -> Result<(), AclError> {
        let counters = &self.counters;
        let mut guard = self.lock();
        let Inner { stream, pools } = &mut *guard;
        let mut host = Vec::new();
        let upload = |pools: &mut Pools, src: &[f32], host: &mut Vec<T>| {
            T::convert(src, host);
            let mut buf = T::pool(pools).take(&self.device, src.len(), counters)?;
            buf.copy_from_host(host)?;
            bump(&counters.h2d_copies, 1);
            bump(&counters.h2d_bytes, buf.bytes() as u64);
            Ok::<_, AclError>(buf)
        };
        let da = upload(pools, a, &mut host)?;
        let db = match b {
            Some(b) => Some(upload(pools, b, &mut host)?),
            None => None,
        };
        let mut dc = pools.f32.take(&self.device, c.len(), counters)?;
        stream.gemm(dims, 1.0, &da, db.as_ref().unwrap_or(&da), 0.0, &mut dc)?;
        bump(&counters.gemms, 1);
        stream.synchronize()?;
        dc.copy_to_host(c)?;
        bump(&counters.d2h_copies, 1);
        bump(&counters.d2h_bytes, dc.bytes() as u64);
        // Only buffers of a successful call go back: after a failure their state is unknown.
        T::pool(pools).give(da);
        if let Some(db) = db {
            T::pool(pools).give(db);
        }
        pools.f32.give(dc);
        Ok(())
    }
}

impl Device for AscendDevice {
    fn name(&self) -> &str {
        &self.label
    }

    fn matmul_t(
        &self,
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), DeviceError> {
        const OP: &str = "matmul_t";
        check_matmul_t(x.len(), w.len(), out.len(), (m, k, n))?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            out.fill(0.0);
            return Ok(());
        }
        self.check_range(OP, "x", x)?;
        self.check_range(OP, "w", w)?;
        let dims = GemmDims {
            m,
            n,
            k,
            trans_a: Trans::N,
            trans_b: Trans::T,
        };
        self.gemm(dims, x, Some(w), out)
            .map_err(|e| self.backend(OP, e))
    }

    fn add_bias(&self, out: &mut [f32], bias: &[f32]) -> Result<(), DeviceError> {
        self.host_op().add_bias(out, bias)
    }

    fn rms_norm(
        &self,
        x: &[f32],
        weight: &[f32],
        eps: f32,
        out: &mut [f32],
    ) -> Result<(), DeviceError> {
        self.host_op().rms_norm(x, weight, eps, out)
    }

    fn rope(
        &self,
        x: &mut [f32],
        seqlen: usize,
        n_heads: usize,
        head_dim: usize,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<(), DeviceError> {
        self.host_op().rope(x, seqlen, n_heads, head_dim, cos, sin)
    }

    fn causal_attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        shape: &AttnShape,
    ) -> Result<(), DeviceError> {
        self.host_op().causal_attention(q, k, v, out, shape)
    }

    fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), DeviceError> {
        self.host_op().silu_mul(gate, up, out)
    }

    fn add(&self, acc: &mut [f32], x: &[f32]) -> Result<(), DeviceError> {
        self.host_op().add(acc, x)
    }

    fn xtx_accumulate(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        h: &mut [f32],
    ) -> Result<(), DeviceError> {
        const OP: &str = "xtx_accumulate";
        check_xtx(OP, x.len(), h.len(), m, k)?;
        if m == 0 || k == 0 {
            return Ok(());
        }
        self.check_range(OP, "x", x)?;
        // xᵀx as a GEMM: result [k, k], reduced over the m rows; x stored [m, k] is op(a)ᵀ.
        let dims = GemmDims {
            m: k,
            n: k,
            k: m,
            trans_a: Trans::T,
            trans_b: Trans::N,
        };
        let mut gram = vec![0.0f32; h.len()];
        self.gemm(dims, x, None, &mut gram)
            .map_err(|e| self.backend(OP, e))?;
        h.iter_mut().zip(&gram).for_each(|(a, g)| *a += g);
        Ok(())
    }

    fn xtx_accumulate_f64(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        h: &mut [f64],
    ) -> Result<(), DeviceError> {
        // The NPU GEMM has no f64: products and sums in f64 stay on the CPU.
        self.host_op().xtx_accumulate_f64(x, m, k, h)
    }
}
