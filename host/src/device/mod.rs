//! The compute device: every numeric op of the forward pass and of the statistics goes through
//! [`Device`], so the scheduler and the algorithms never call a BLAS directly and an
//! accelerator backend replaces [`CpuDevice`]: [`AscendDevice`] runs the GEMMs on an Ascend NPU.
//!
//! Conventions: activations are row-major `[tokens, features]`; `tokens = n_seq · seqlen`
//! with the sequences one after the other; a linear layer's weight is `[out, in]` as in
//! PyTorch. Every op checks its operand lengths and reports a [`DeviceError`] naming the op and
//! the operand instead of panicking.

mod ascend;
mod cpu;

pub use ascend::{AscendDevice, GemmPrecision, TransferStats};
pub use cpu::CpuDevice;

/// An operand whose length does not match the shape the op was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// An operand has the wrong number of elements.
    #[error("{op}: operand {operand} has {found} elements, expected {expected} ({shape})")]
    Shape {
        /// The op, e.g. `"matmul_t"`.
        op: &'static str,
        /// The operand, e.g. `"w"`.
        operand: &'static str,
        /// Elements implied by the shape.
        expected: usize,
        /// Elements passed.
        found: usize,
        /// The shape, spelled out (e.g. `"[n=32, k=64]"`).
        shape: String,
    },
    /// Shape parameters that are inconsistent with each other.
    #[error("{op}: {message}")]
    Invalid {
        /// The op.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The backend failed (an AscendCL call, an operand it cannot represent).
    #[error("{op} on {device}: {message}")]
    Backend {
        /// The op.
        op: &'static str,
        /// The device, e.g. `"ascend:0"`.
        device: String,
        /// The backend's error, naming the failed call.
        message: String,
    },
}

/// Shape of a causal self-attention call (grouped-query: `n_heads / n_kv_heads` query heads
/// share one key/value head, as `repeat_kv` does in transformers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    /// Independent sequences, one after the other in the token dimension.
    pub n_seq: usize,
    /// Tokens per sequence (positions 0..seqlen).
    pub seqlen: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; divides `n_heads`.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Multiplies `q·kᵀ` before the softmax (normally `head_dim^-1/2`).
    pub scale: f32,
}

/// The compute backend. Object-safe: the forward pass takes `&dyn Device`.
///
/// Every op works on host slices, f32 unless stated, and returns `Err` only for operand
/// lengths inconsistent with the given shape (or a backend failure).
pub trait Device: Send + Sync {
    /// A short name for logs, e.g. `"cpu"`.
    fn name(&self) -> &str;

    /// The linear layer without bias: `out[m,n] = x[m,k] · w[n,k]ᵀ`.
    fn matmul_t(
        &self,
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), DeviceError>;

    /// Adds `bias[n]` to every row of `out[rows, n]`.
    fn add_bias(&self, out: &mut [f32], bias: &[f32]) -> Result<(), DeviceError>;

    /// RMSNorm of every row of `x[rows, d]` (`d = weight.len()`), computed in f32 as
    /// transformers does: `out = weight · x / sqrt(mean(x²) + eps)`.
    fn rms_norm(
        &self,
        x: &[f32],
        weight: &[f32],
        eps: f32,
        out: &mut [f32],
    ) -> Result<(), DeviceError>;

    /// Rotary embedding in place, rotate-half convention:
    /// `x ← x·cos + rotate_half(x)·sin`, `rotate_half([a, b]) = [-b, a]` over the two halves of
    /// each head. `x: [n_seq·seqlen, n_heads·head_dim]`; `cos, sin: [seqlen, head_dim]`, row `p`
    /// used for position `p` of every sequence.
    fn rope(
        &self,
        x: &mut [f32],
        seqlen: usize,
        n_heads: usize,
        head_dim: usize,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<(), DeviceError>;

    /// Causal scaled dot-product attention per sequence, softmax in f32:
    /// `out_h = softmax(scale · q_h·k_gᵀ + causal mask) · v_g` with `g = h / (n_heads/n_kv_heads)`.
    /// `q, out: [tokens, n_heads·head_dim]`; `k, v: [tokens, n_kv_heads·head_dim]`.
    fn causal_attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        shape: &AttnShape,
    ) -> Result<(), DeviceError>;

    /// SwiGLU: `out = silu(gate) · up` elementwise, `silu(x) = x / (1 + e^-x)`.
    fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), DeviceError>;

    /// Residual add: `acc += x` elementwise.
    fn add(&self, acc: &mut [f32], x: &[f32]) -> Result<(), DeviceError>;

    /// Hessian statistics in f32: `h[k,k] += x[m,k]ᵀ · x[m,k]`.
    fn xtx_accumulate(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        h: &mut [f32],
    ) -> Result<(), DeviceError>;

    /// `h[k,k] += x[m,k]ᵀ · x[m,k]` with products and sums in f64 (for many calibration tokens).
    fn xtx_accumulate_f64(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        h: &mut [f64],
    ) -> Result<(), DeviceError>;
}

/// The operand lengths of `matmul_t`: `x [m, k]`, `w [n, k]`, `out [m, n]`.
pub(crate) fn check_matmul_t(
    x: usize,
    w: usize,
    out: usize,
    (m, k, n): (usize, usize, usize),
) -> Result<(), DeviceError> {
    const OP: &str = "matmul_t";
    let shape = || format!("x [m={m}, k={k}], w [n={n}, k={k}], out [m={m}, n={n}]");
    check_len(OP, "x", x, checked_mul(OP, &[m, k])?, shape)?;
    check_len(OP, "w", w, checked_mul(OP, &[n, k])?, shape)?;
    check_len(OP, "out", out, checked_mul(OP, &[m, n])?, shape)
}

/// The operand lengths of the `XᵀX` accumulations `op`: `x [m, k]`, `h [k, k]`.
pub(crate) fn check_xtx(
    op: &'static str,
    x: usize,
    h: usize,
    m: usize,
    k: usize,
) -> Result<(), DeviceError> {
    let shape = || format!("x [m={m}, k={k}], h [k={k}, k={k}]");
    check_len(op, "x", x, checked_mul(op, &[m, k])?, shape)?;
    check_len(op, "h", h, checked_mul(op, &[k, k])?, shape)
}

/// `Err` unless `found == expected`.
pub(crate) fn check_len(
    op: &'static str,
    operand: &'static str,
    found: usize,
    expected: usize,
    shape: impl FnOnce() -> String,
) -> Result<(), DeviceError> {
    if found == expected {
        Ok(())
    } else {
        Err(DeviceError::Shape {
            op,
            operand,
            expected,
            found,
            shape: shape(),
        })
    }
}

/// The product of `dims` (an element count), or an error naming the op if it overflows.
pub(crate) fn checked_mul(op: &'static str, dims: &[usize]) -> Result<usize, DeviceError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DeviceError::Invalid {
            op,
            message: format!("shape {dims:?} overflows"),
        })
}
