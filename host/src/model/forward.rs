//! The f32 forward pass of a decoder-only model, as transformers' eager implementation
//! computes it (Llama, Mistral, Qwen2, Qwen3), through a [`Device`].
//!
//! Shapes: `T = n_seq · seqlen` tokens (sequences one after the other, each at positions
//! `0..seqlen`), `H` = hidden size, `Hq`/`Hkv` query/key-value heads of width `D`, `F` = MLP
//! width, `V` = vocabulary. Activations are row-major `[T, features]`.
//!
//! One decoder block:
//! ```text
//! x = input_norm(h)                                   ── Tap::AttnInput   [T, H]
//! q, k, v = x·Wqᵀ(+b), x·Wkᵀ(+b), x·Wvᵀ(+b)
//! q, k = q_norm(q), k_norm(k)       (Qwen3, per head)
//! q, k = rope(q), rope(k)
//! c = causal_attention(q, k, v)                       ── Tap::AttnContext [T, Hq·D]
//! h += c·Woᵀ(+b)
//! x = post_attention_norm(h)                          ── Tap::MlpInput    [T, H]
//! m = silu(x·Wgateᵀ) · (x·Wupᵀ)                       ── Tap::MlpHidden   [T, F]
//! h += m·Wdownᵀ(+b)
//! ```
//! The model's weights stay memory-mapped; [`BlockWeights::load`] converts one block to f32.

use std::borrow::Cow;
use std::path::PathBuf;

use super::fakequant::ActQuant;
use super::{dtype_bytes_to_f32, Model, ModelConfig, ModelError, Weights};
use crate::arch::{family_for, ArchError, Family, LinearRole};
use crate::device::{AttnShape, CpuDevice, Device, DeviceError};

pub use super::config::RopeScaling;
pub use crate::arch::Tap;

/// An error of the forward pass; each names the tensor, key or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A weight whose shape disagrees with config.json.
    #[error("tensor \"{tensor}\" ({what}) has shape {found:?}, expected {expected:?} from {}", config.display())]
    Shape {
        tensor: String,
        /// Its role, e.g. "q weight of block 3".
        what: String,
        found: Vec<usize>,
        expected: Vec<usize>,
        config: PathBuf,
    },
    /// A tensor the family file and config.json require is not in the checkpoint.
    #[error("tensor \"{tensor}\" ({what}) is not in the model at {}", dir.display())]
    MissingTensor {
        tensor: String,
        /// Why it is needed.
        what: String,
        dir: PathBuf,
    },
    /// A token id outside `0..vocab_size`.
    #[error("token id {id} at position {position} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        id: u32,
        position: usize,
        vocab: usize,
    },
    /// Activations or ids whose length does not match the shape asked for.
    #[error("{what} has {found} elements, expected {expected} ({shape})")]
    InputLength {
        what: &'static str,
        found: usize,
        expected: usize,
        shape: String,
    },
    /// A block index at or beyond `num_hidden_layers`.
    #[error("block {block} does not exist: {} sets num_hidden_layers = {blocks}", config.display())]
    NoSuchBlock {
        block: usize,
        blocks: usize,
        config: PathBuf,
    },
    /// Sequences longer than the model's attention window (not implemented).
    #[error("sequences of {seqlen} tokens exceed the sliding window of {window} tokens set in {}; sliding-window attention is not implemented", config.display())]
    SlidingWindow {
        seqlen: usize,
        window: usize,
        config: PathBuf,
    },
    /// The input quantizer of a linear refused its input (e.g. NaN activations).
    #[error("activation quantization failed: {0}")]
    ActQuant(String),
    /// A resumed block forward asked to stop at a tap before the one it resumes from.
    #[error("a block forward resumed at tap `{from}` cannot stop at the earlier tap `{to}`")]
    ResumeBackwards {
        from: &'static str,
        to: &'static str,
    },
}

// ---------------------------------------------------------------------------------------------
// Weights

/// A linear layer `y = x·Wᵀ + b`. `Cow` lets a search swap in candidate weights without
/// copying the rest of the block (see [`BlockWeights::borrowed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Linear<'a> {
    /// `[out_features, in_features]`, row-major (as PyTorch stores it).
    pub weight: Cow<'a, [f32]>,
    /// `[out_features]`.
    pub bias: Option<Cow<'a, [f32]>>,
    pub out_features: usize,
    pub in_features: usize,
    /// Fake quantization of the input (W8A8 and friends); `None`: float input.
    pub act: Option<ActQuant>,
}

impl<'a> Linear<'a> {
    /// A layer from its weight `[out, in]` and optional bias `[out]`; lengths are checked.
    pub fn new(
        weight: impl Into<Cow<'a, [f32]>>,
        bias: Option<Cow<'a, [f32]>>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Linear<'a>, ForwardError> {
        let weight = weight.into();
        let shape = || format!("[out={out_features}, in={in_features}]");
        check_len(
            "linear weight",
            weight.len(),
            out_features * in_features,
            shape,
        )?;
        if let Some(b) = &bias {
            check_len("linear bias", b.len(), out_features, shape)?;
        }
        Ok(Linear {
            weight,
            bias,
            out_features,
            in_features,
            act: None,
        })
    }

    /// The same layer borrowing this one's data.
    pub fn borrowed(&self) -> Linear<'_> {
        Linear {
            weight: Cow::Borrowed(&self.weight),
            bias: self.bias.as_deref().map(Cow::Borrowed),
            out_features: self.out_features,
            in_features: self.in_features,
            act: self.act,
        }
    }

    /// `y[T, out] = Q(x)[T, in]·Wᵀ (+ b)`, `Q` the input quantizer if any.
    pub fn forward(&self, dev: &dyn Device, x: &[f32]) -> Result<Vec<f32>, ForwardError> {
        let rows = x.len() / self.in_features.max(1);
        check_len("linear input", x.len(), rows * self.in_features, || {
            format!("[T, in={}]", self.in_features)
        })?;
        let quantized;
        let x = match &self.act {
            None => x,
            Some(a) => {
                quantized = a
                    .apply(x, self.in_features)
                    .map_err(|e| ForwardError::ActQuant(e.to_string()))?;
                &quantized[..]
            }
        };
        let mut y = vec![0.0; rows * self.out_features];
        dev.matmul_t(
            x,
            &self.weight,
            &mut y,
            rows,
            self.in_features,
            self.out_features,
        )?;
        if let Some(b) = &self.bias {
            dev.add_bias(&mut y, b)?;
        }
        Ok(y)
    }
}

/// The f32 weights of one decoder block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockWeights<'a> {
    /// The block index.
    pub block: usize,
    /// `[H]`.
    pub input_norm: Cow<'a, [f32]>,
    /// `[Hq·D, H]`.
    pub q: Linear<'a>,
    /// `[Hkv·D, H]`.
    pub k: Linear<'a>,
    /// `[Hkv·D, H]`.
    pub v: Linear<'a>,
    /// `[H, Hq·D]`.
    pub o: Linear<'a>,
    /// `[D]`, per-head RMSNorm of q before RoPE (Qwen3).
    pub q_norm: Option<Cow<'a, [f32]>>,
    /// `[D]`, per-head RMSNorm of k before RoPE (Qwen3).
    pub k_norm: Option<Cow<'a, [f32]>>,
    /// `[H]`.
    pub post_attention_norm: Cow<'a, [f32]>,
    /// `[F, H]`.
    pub gate: Linear<'a>,
    /// `[F, H]`.
    pub up: Linear<'a>,
    /// `[H, F]`.
    pub down: Linear<'a>,
}

/// A tensor converted to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorF32<'a> {
    pub shape: Vec<usize>,
    /// Row-major; borrowed when the source already holds f32 (no copy per forward).
    pub values: Cow<'a, [f32]>,
}

/// Where weights come from: the memory-mapped checkpoint, or (later) a scheduler's working
/// copy holding already-quantized tensors.
pub trait TensorSource {
    /// Tensor `name` in f32, `None` if there is no such tensor.
    fn tensor_f32(&self, name: &str) -> Result<Option<TensorF32<'_>>, ModelError>;
    /// The directory named in errors.
    fn dir(&self) -> PathBuf;
    /// Rows `rows` of the 2-D tensor `name` in f32, row-major `[rows.len(), cols]`, with the
    /// tensor's full shape; `None` if there is no such tensor. When the tensor is not 2-D or a
    /// row is out of range, the values are empty (the caller checks the shape first).
    /// Default: converts the whole tensor and gathers the rows.
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<Option<RowsF32>, ModelError> {
        let Some(t) = self.tensor_f32(name)? else {
            return Ok(None);
        };
        Ok(Some(gather_rows(t.shape, rows, |r, cols| {
            Ok(t.values[r * cols..(r + 1) * cols].to_vec())
        })?))
    }
    /// Drops memory-mapped pages of every tensor whose name starts with `prefix`, once their
    /// f32 copies are made (keeps a pass over a large checkpoint from growing resident memory).
    /// Nothing changes for later reads. Default: nothing to drop.
    fn release_prefix(&self, _prefix: &str) {}
}

/// Some rows of a 2-D tensor: its full `shape` and the rows' values (see
/// [`TensorSource::rows_f32`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RowsF32 {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// `rows` of a tensor of `shape`, each produced by `row(index, cols)`; empty values when the
/// tensor is not 2-D or a row is out of range.
fn gather_rows(
    shape: Vec<usize>,
    rows: &[usize],
    mut row: impl FnMut(usize, usize) -> Result<Vec<f32>, ModelError>,
) -> Result<RowsF32, ModelError> {
    let mut values = Vec::new();
    if let [n, cols] = shape[..] {
        if rows.iter().all(|r| *r < n) {
            values.reserve(rows.len() * cols);
            for &r in rows {
                values.extend(row(r, cols)?);
            }
        }
    }
    Ok(RowsF32 { shape, values })
}

impl TensorSource for Weights {
    fn tensor_f32(&self, name: &str) -> Result<Option<TensorF32<'_>>, ModelError> {
        if !self.contains(name) {
            return Ok(None);
        }
        Ok(Some(TensorF32 {
            shape: self.info(name)?.shape().to_vec(),
            values: Cow::Owned(self.to_f32(name)?),
        }))
    }

    fn dir(&self) -> PathBuf {
        Weights::dir(self).to_path_buf()
    }

    /// Reads and converts only the requested rows.
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<Option<RowsF32>, ModelError> {
        if !self.contains(name) {
            return Ok(None);
        }
        let info = self.info(name)?;
        let dtype = info.dtype();
        let unsupported = || ModelError::UnsupportedDType {
            tensor: name.to_string(),
            dtype,
        };
        if !dtype.converts_to_f32() {
            return Err(unsupported());
        }
        let raw = self.raw_bytes(name)?;
        let rows = gather_rows(info.shape().to_vec(), rows, |r, _| {
            let row_bytes = raw.len() / info.shape()[0];
            dtype_bytes_to_f32(&raw[r * row_bytes..(r + 1) * row_bytes], dtype)
                .map_err(|_| unsupported())
        })?;
        Ok(Some(rows))
    }

    fn release_prefix(&self, prefix: &str) {
        for name in self.names().filter(|n| n.starts_with(prefix)) {
            // Only fails for unknown names, which these are not.
            let _ = self.release(name);
        }
    }
}

impl<'s> BlockWeights<'s> {
    /// Block `block` of `model` in f32: reads only that block's tensors from the memory map.
    pub fn load(
        model: &Model,
        family: &Family,
        block: usize,
    ) -> Result<BlockWeights<'static>, ForwardError> {
        let w = BlockWeights::load_from(&model.config, family, block, &model.weights)?;
        Ok(w.into_owned())
    }

    /// Block `block` from any [`TensorSource`], shapes checked against `cfg`. Biases are
    /// read for exactly the linears the family and config.json give one (transformers ignores
    /// any other bias tensor).
    pub fn load_from(
        cfg: &ModelConfig,
        family: &Family,
        block: usize,
        src: &'s dyn TensorSource,
    ) -> Result<BlockWeights<'s>, ForwardError> {
        if block >= cfg.num_hidden_layers {
            return Err(ForwardError::NoSuchBlock {
                block,
                blocks: cfg.num_hidden_layers,
                config: cfg.path.clone(),
            });
        }
        let d = Dims::new(cfg);
        let m = &family.modules;
        let biased = family.bias_roles(cfg.attention_bias, cfg.mlp_bias);
        let get = |module: &str, param: &str, what: String, shape: &[usize]| {
            let name = family.block_tensor(block, module, param);
            read_tensor(cfg, src, &name, &what, shape)
        };
        let linear = |role: LinearRole| -> Result<Linear<'s>, _> {
            let [out, inp] = linear_shape(cfg, role);
            let (module, r) = (m.linear(role), role.name());
            let weight = get(
                module,
                "weight",
                format!("{r} weight of block {block}"),
                &[out, inp],
            )?;
            let bias = if biased.contains(&role) {
                let why = bias_reason(family, role);
                let b = get(
                    module,
                    "bias",
                    format!("{r} bias of block {block}; {why}"),
                    &[out],
                )?;
                Some(b)
            } else {
                None
            };
            Linear::new(weight, bias, out, inp)
        };
        let norm = |module: &str, width: usize| {
            get(
                module,
                "weight",
                format!("RMSNorm {module} of block {block}"),
                &[width],
            )
        };
        let qk_norm =
            |module: &Option<String>| module.as_deref().map(|m| norm(m, d.head_dim)).transpose();
        Ok(BlockWeights {
            block,
            input_norm: norm(&m.input_norm, d.hidden)?,
            q: linear(LinearRole::Q)?,
            k: linear(LinearRole::K)?,
            v: linear(LinearRole::V)?,
            o: linear(LinearRole::O)?,
            q_norm: qk_norm(&m.q_norm)?,
            k_norm: qk_norm(&m.k_norm)?,
            post_attention_norm: norm(&m.post_attention_norm, d.hidden)?,
            gate: linear(LinearRole::Gate)?,
            up: linear(LinearRole::Up)?,
            down: linear(LinearRole::Down)?,
        })
    }
}

impl<'a> BlockWeights<'a> {
    /// The same weights, owning every value (copies what was borrowed).
    pub fn into_owned(self) -> BlockWeights<'static> {
        let own = |c: Cow<'a, [f32]>| Cow::Owned(c.into_owned());
        let lin = |l: Linear<'a>| Linear {
            weight: own(l.weight),
            bias: l.bias.map(own),
            out_features: l.out_features,
            in_features: l.in_features,
            act: l.act,
        };
        BlockWeights {
            block: self.block,
            input_norm: own(self.input_norm),
            q: lin(self.q),
            k: lin(self.k),
            v: lin(self.v),
            o: lin(self.o),
            q_norm: self.q_norm.map(own),
            k_norm: self.k_norm.map(own),
            post_attention_norm: own(self.post_attention_norm),
            gate: lin(self.gate),
            up: lin(self.up),
            down: lin(self.down),
        }
    }

    /// The same weights, borrowed: replace one linear of the result to evaluate a candidate
    /// without copying the others.
    pub fn borrowed(&self) -> BlockWeights<'_> {
        BlockWeights {
            block: self.block,
            input_norm: Cow::Borrowed(&self.input_norm),
            q: self.q.borrowed(),
            k: self.k.borrowed(),
            v: self.v.borrowed(),
            o: self.o.borrowed(),
            q_norm: self.q_norm.as_deref().map(Cow::Borrowed),
            k_norm: self.k_norm.as_deref().map(Cow::Borrowed),
            post_attention_norm: Cow::Borrowed(&self.post_attention_norm),
            gate: self.gate.borrowed(),
            up: self.up.borrowed(),
            down: self.down.borrowed(),
        }
    }

    /// The linear of a role.
    pub fn linear(&self, role: LinearRole) -> &Linear<'a> {
        match role {
            LinearRole::Q => &self.q,
            LinearRole::K => &self.k,
            LinearRole::V => &self.v,
            LinearRole::O => &self.o,
            LinearRole::Gate => &self.gate,
            LinearRole::Up => &self.up,
            LinearRole::Down => &self.down,
        }
    }

    /// The linear of a role, to replace it.
    pub fn linear_mut(&mut self, role: LinearRole) -> &mut Linear<'a> {
        match role {
            LinearRole::Q => &mut self.q,
            LinearRole::K => &mut self.k,
            LinearRole::V => &mut self.v,
            LinearRole::O => &mut self.o,
            LinearRole::Gate => &mut self.gate,
            LinearRole::Up => &mut self.up,
            LinearRole::Down => &mut self.down,
        }
    }
}

/// Why a linear has a bias, for a missing-tensor error.
fn bias_reason(family: &Family, role: LinearRole) -> String {
    if family.bias.always.contains(&role) {
        format!("the {} family always has it", family.family)
    } else if family.bias.attention_bias.contains(&role) {
        "config.json sets attention_bias".to_string()
    } else {
        "config.json sets mlp_bias".to_string()
    }
}

/// Reads `name` from `src` in f32 and checks its shape.
/// Tensor `name` of `src` in f32, required, with shape `expected` (`what` names its role in errors).
pub fn read_tensor<'s>(
    cfg: &ModelConfig,
    src: &'s dyn TensorSource,
    name: &str,
    what: &str,
    expected: &[usize],
) -> Result<Cow<'s, [f32]>, ForwardError> {
    let t = src
        .tensor_f32(name)?
        .ok_or_else(|| ForwardError::MissingTensor {
            tensor: name.to_string(),
            what: what.to_string(),
            dir: src.dir(),
        })?;
    check_shape(cfg, name, what, &t.shape, expected)?;
    Ok(t.values)
}

fn check_len(
    what: &'static str,
    found: usize,
    expected: usize,
    shape: impl FnOnce() -> String,
) -> Result<(), ForwardError> {
    if found == expected {
        Ok(())
    } else {
        Err(ForwardError::InputLength {
            what,
            found,
            expected,
            shape: shape(),
        })
    }
}

/// `[out, in]` of a block linear as config.json implies it.
pub fn linear_shape(cfg: &ModelConfig, role: LinearRole) -> [usize; 2] {
    let d = Dims::new(cfg);
    match role {
        LinearRole::Q => [d.q_width(), d.hidden],
        LinearRole::K | LinearRole::V => [d.kv_width(), d.hidden],
        LinearRole::O => [d.hidden, d.q_width()],
        LinearRole::Gate | LinearRole::Up => [d.ffn, d.hidden],
        LinearRole::Down => [d.hidden, d.ffn],
    }
}

/// Width of the subset input observed at `tap`: the input width of the linears it feeds.
pub fn tap_width(cfg: &ModelConfig, tap: Tap) -> usize {
    let role = LinearRole::ALL
        .into_iter()
        .find(|r| r.input_tap() == tap)
        .unwrap_or(LinearRole::Q);
    linear_shape(cfg, role)[1]
}

/// The sizes of config.json the forward needs.
#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    /// `rms_norm_eps` as the f32 that torch adds to the f32 variance.
    eps: f32,
}

impl Dims {
    fn new(cfg: &ModelConfig) -> Dims {
        Dims {
            hidden: cfg.hidden_size,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            ffn: cfg.intermediate_size,
            eps: cfg.rms_norm_eps as f32,
        }
    }

    fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// RoPE inverse frequencies `inv_freq[i] = 1 / θ^(2i/D)`, `i in 0..D/2`, rescaled per
/// `rope_scaling`, in f32 step by step as transformers computes them.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let theta = cfg.rope_theta as f32;
    // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all f32.
    let inv_freq = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32));
    match cfg.rope_scaling {
        RopeScaling::None => inv_freq.collect(),
        RopeScaling::Linear { factor } => inv_freq.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => inv_freq
            .map(|f| {
                llama3_inv_freq(
                    f,
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                )
            })
            .collect(),
    }
}

/// transformers' `_compute_llama3_parameters` for one frequency: wavelengths longer than
/// `old_ctx / low` are slowed by `factor`, shorter than `old_ctx / high` kept, and blended
/// linearly in `old_ctx / wavelen` between. Each step rounds to f32 as torch does
/// (`scalar / tensor` is `tensor.reciprocal() * scalar` there).
fn llama3_inv_freq(inv_freq: f32, factor: f64, low: f64, high: f64, old_ctx: usize) -> f32 {
    let (factor32, low32) = (factor as f32, low as f32);
    let low_freq_wavelen = (old_ctx as f64 / low) as f32;
    let high_freq_wavelen = (old_ctx as f64 / high) as f32;
    let wavelen = (1.0 / inv_freq) * (2.0 * std::f64::consts::PI) as f32;
    let slowed = if wavelen > low_freq_wavelen {
        inv_freq / factor32
    } else {
        inv_freq
    };
    // torch: ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen); wavelen is finite.
    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
    if !medium {
        return slowed;
    }
    let smooth = ((1.0 / wavelen) * old_ctx as f32 - low32) / (high - low) as f32;
    (1.0 - smooth) * slowed / factor32 + smooth * slowed
}

/// `cos` and `sin` of `p · inv_freq`, `[seqlen, D]` with the half table repeated (transformers'
/// `emb = cat(freqs, freqs)`), for positions `p in 0..seqlen`.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTables {
    pub seqlen: usize,
    pub head_dim: usize,
    /// `[seqlen, head_dim]`.
    pub cos: Vec<f32>,
    /// `[seqlen, head_dim]`.
    pub sin: Vec<f32>,
}

impl RopeTables {
    /// The tables for positions `0..seqlen` (f32 products and f32 cos/sin, as transformers).
    pub fn new(cfg: &ModelConfig, seqlen: usize) -> RopeTables {
        let inv_freq = rope_inv_freq(cfg);
        let d = cfg.head_dim;
        let (mut cos, mut sin) = (
            Vec::with_capacity(seqlen * d),
            Vec::with_capacity(seqlen * d),
        );
        for p in 0..seqlen {
            let freqs: Vec<f32> = inv_freq.iter().map(|f| f * p as f32).collect();
            for _half in 0..2 {
                cos.extend(freqs.iter().map(|a| a.cos()));
                sin.extend(freqs.iter().map(|a| a.sin()));
            }
        }
        RopeTables {
            seqlen,
            head_dim: d,
            cos,
            sin,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The block

/// `out[T, width] = RMSNorm(x)` with `weight[width]`.
/// RMSNorm of the rows of `x` with `weight`.
pub fn rms_norm(
    dev: &dyn Device,
    x: &[f32],
    weight: &[f32],
    eps: f32,
) -> Result<Vec<f32>, ForwardError> {
    let mut out = vec![0.0; x.len()];
    dev.rms_norm(x, weight, eps, &mut out)?;
    Ok(out)
}

/// One decoder block on the residual stream `h: [T, H]` (updated in place), calling `tap`
/// with each subset input as soon as it is computed ([`Tap`] order).
pub fn block_forward(
    dev: &dyn Device,
    cfg: &ModelConfig,
    w: &BlockWeights<'_>,
    h: &mut [f32],
    n_seq: usize,
    seqlen: usize,
    tap: &mut dyn FnMut(Tap, &[f32]),
) -> Result<(), ForwardError> {
    block_forward_probed(dev, cfg, w, h, n_seq, seqlen, tap, &mut |_, _| {})
}

/// [`block_forward`] that also shows every linear's output `[T, out]` to `output` (q, k, v
/// before q_norm/k_norm and RoPE), in execution order.
#[allow(clippy::too_many_arguments)]
pub fn block_forward_probed(
    dev: &dyn Device,
    cfg: &ModelConfig,
    w: &BlockWeights<'_>,
    h: &mut [f32],
    n_seq: usize,
    seqlen: usize,
    tap: &mut dyn FnMut(Tap, &[f32]),
    output: &mut dyn FnMut(LinearRole, &[f32]),
) -> Result<(), ForwardError> {
    block_forward_inner(dev, cfg, w, h, n_seq, seqlen, None, None, tap, output).map(|_| ())
}

/// The block only as far as tap `last`: `tap` sees every tap up to and including `last`, then
/// the forward stops. `h` is left partly updated (only the taps are the result): for statistics
/// passes, which need a subset's input but not the block's output.
#[allow(clippy::too_many_arguments)]
pub fn block_forward_until(
    dev: &dyn Device,
    cfg: &ModelConfig,
    w: &BlockWeights<'_>,
    h: &mut [f32],
    n_seq: usize,
    seqlen: usize,
    last: Tap,
    tap: &mut dyn FnMut(Tap, &[f32]),
) -> Result<(), ForwardError> {
    block_forward_resume(dev, cfg, w, h, None, n_seq, seqlen, last, tap).map(|_| ())
}

/// [`block_forward_until`] that can start where an earlier call stopped: `from = (t, x)` means
/// `h` is the residual stream as that call left it and `x` is the value of tap `t`, computed with
/// the weights of the modules before `t` that `w` still holds. `tap` sees `t` again, then every
/// later tap up to `last`. Returns the value of `last`, the `x` of the next resumption.
///
/// Errors when `t` comes after `last` (a forward cannot go back).
#[allow(clippy::too_many_arguments)]
pub fn block_forward_resume(
    dev: &dyn Device,
    cfg: &ModelConfig,
    w: &BlockWeights<'_>,
    h: &mut [f32],
    from: Option<(Tap, Vec<f32>)>,
    n_seq: usize,
    seqlen: usize,
    last: Tap,
    tap: &mut dyn FnMut(Tap, &[f32]),
) -> Result<Vec<f32>, ForwardError> {
    if let Some((t, _)) = &from {
        if t.rank() > last.rank() {
            return Err(ForwardError::ResumeBackwards {
                from: t.name(),
                to: last.name(),
            });
        }
    }
    let reached = block_forward_inner(
        dev,
        cfg,
        w,
        h,
        n_seq,
        seqlen,
        from,
        Some(last),
        tap,
        &mut |_, _| {},
    )?;
    Ok(reached.unwrap_or_default())
}

/// The block's data flow, one tap at a time: from the tap after `from` (the first, without
/// it) on, each tap's value is computed from the previous one and shown to `tap`; `until` stops
/// after that tap and returns its value, otherwise down_proj and the residual finish the block.
#[allow(clippy::too_many_arguments)]
fn block_forward_inner(
    dev: &dyn Device,
    cfg: &ModelConfig,
    w: &BlockWeights<'_>,
    h: &mut [f32],
    n_seq: usize,
    seqlen: usize,
    from: Option<(Tap, Vec<f32>)>,
    until: Option<Tap>,
    tap: &mut dyn FnMut(Tap, &[f32]),
    output: &mut dyn FnMut(LinearRole, &[f32]),
) -> Result<Option<Vec<f32>>, ForwardError> {
    let d = Dims::new(cfg);
    check_len("hidden states", h.len(), n_seq * seqlen * d.hidden, || {
        format!("[n_seq={n_seq} · seqlen={seqlen}, hidden={}]", d.hidden)
    })?;
    let (start, mut x) = match from {
        Some((t, x)) => {
            check_len(
                "resumed tap",
                x.len(),
                n_seq * seqlen * tap_width(cfg, t),
                || format!("[tokens, {}] at tap {}", tap_width(cfg, t), t.name()),
            )?;
            tap(t, &x);
            if until == Some(t) {
                return Ok(Some(x));
            }
            (t.rank() + 1, x)
        }
        None => (0, Vec::new()),
    };
    for &t in &Tap::ALL[start..] {
        // `x` holds the previous tap's value.
        x = match t {
            Tap::AttnInput => rms_norm(dev, h, &w.input_norm, d.eps)?,
            Tap::AttnContext => attention_context_probed(dev, cfg, w, &x, n_seq, seqlen, output)?,
            Tap::MlpInput => {
                let o = w.o.forward(dev, &x)?;
                output(LinearRole::O, &o);
                dev.add(h, &o)?;
                rms_norm(dev, h, &w.post_attention_norm, d.eps)?
            }
            Tap::MlpHidden => mlp_hidden_probed(dev, w, &x, output)?,
        };
        tap(t, &x);
        if until == Some(t) {
            return Ok(Some(x));
        }
    }
    let down = w.down.forward(dev, &x)?;
    output(LinearRole::Down, &down);
    dev.add(h, &down)?;
    Ok(None)
}

/// The attention module through `o_proj`: `x_normed: [T, H]` (the output of input_norm)
/// → `[T, H]`, without the residual.
pub fn attention_forward(
    dev: &dyn Device,
    cfg: &ModelConfig,
    w: &BlockWeights<'_>,
    x_normed: &[f32],
    n_seq: usize,
    seqlen: usize,
) -> Result<Vec<f32>, ForwardError> {
    let ctx = attention_context(dev, cfg, w, x_normed, n_seq, seqlen)?;
    w.o.forward(dev, &ctx)
}

/// The attention output before `o_proj`: `x_normed: [T, H]` → `[T, Hq·D]` (heads
/// concatenated), i.e. the input of `o_proj`.
pub fn attention_context(
    dev: &dyn Device,
    cfg: &ModelConfig,
    w: &BlockWeights<'_>,
    x_normed: &[f32],
    n_seq: usize,
    seqlen: usize,
) -> Result<Vec<f32>, ForwardError> {
    attention_context_probed(dev, cfg, w, x_normed, n_seq, seqlen, &mut |_, _| {})
}

fn attention_context_probed(
    dev: &dyn Device,
    cfg: &ModelConfig,
    w: &BlockWeights<'_>,
    x_normed: &[f32],
    n_seq: usize,
    seqlen: usize,
    output: &mut dyn FnMut(LinearRole, &[f32]),
) -> Result<Vec<f32>, ForwardError> {
    let d = Dims::new(cfg);
    check_len(
        "attention input",
        x_normed.len(),
        n_seq * seqlen * d.hidden,
        || format!("[n_seq={n_seq} · seqlen={seqlen}, hidden={}]", d.hidden),
    )?;
    if let Some(window) = cfg.sliding_window.filter(|&win| seqlen > win) {
        return Err(ForwardError::SlidingWindow {
            seqlen,
            window,
            config: cfg.path.clone(),
        });
    }
    if n_seq == 0 || seqlen == 0 {
        return Ok(Vec::new());
    }
    let mut q = w.q.forward(dev, x_normed)?;
    output(LinearRole::Q, &q);
    let mut k = w.k.forward(dev, x_normed)?;
    output(LinearRole::K, &k);
    let v = w.v.forward(dev, x_normed)?;
    output(LinearRole::V, &v);
    if let Some(qn) = &w.q_norm {
        q = rms_norm(dev, &q, qn, d.eps)?; // per head: rows of head_dim
    }
    if let Some(kn) = &w.k_norm {
        k = rms_norm(dev, &k, kn, d.eps)?;
    }
    let rope = RopeTables::new(cfg, seqlen);
    dev.rope(&mut q, seqlen, d.n_heads, d.head_dim, &rope.cos, &rope.sin)?;
    dev.rope(
        &mut k,
        seqlen,
        d.n_kv_heads,
        d.head_dim,
        &rope.cos,
        &rope.sin,
    )?;
    let shape = AttnShape {
        n_seq,
        seqlen,
        n_heads: d.n_heads,
        n_kv_heads: d.n_kv_heads,
        head_dim: d.head_dim,
        // transformers: head_dim ** -0.5 in Python, applied to the f32 scores.
        scale: (d.head_dim as f64).powf(-0.5) as f32,
    };
    let mut ctx = vec![0.0; q.len()];
    dev.causal_attention(&q, &k, &v, &mut ctx, &shape)?;
    Ok(ctx)
}

/// The MLP through `down_proj`: `x_normed: [T, H]` (the output of post_attention_norm) →
/// `[T, H]`, without the residual.
pub fn mlp_forward(
    dev: &dyn Device,
    w: &BlockWeights<'_>,
    x_normed: &[f32],
) -> Result<Vec<f32>, ForwardError> {
    w.down.forward(dev, &mlp_hidden(dev, w, x_normed)?)
}

/// SwiGLU `silu(x·Wgateᵀ) · (x·Wupᵀ)`: `[T, H]` → `[T, F]`, the input of `down_proj`.
pub fn mlp_hidden(
    dev: &dyn Device,
    w: &BlockWeights<'_>,
    x_normed: &[f32],
) -> Result<Vec<f32>, ForwardError> {
    mlp_hidden_probed(dev, w, x_normed, &mut |_, _| {})
}

fn mlp_hidden_probed(
    dev: &dyn Device,
    w: &BlockWeights<'_>,
    x_normed: &[f32],
    output: &mut dyn FnMut(LinearRole, &[f32]),
) -> Result<Vec<f32>, ForwardError> {
    let gate = w.gate.forward(dev, x_normed)?;
    output(LinearRole::Gate, &gate);
    let up = w.up.forward(dev, x_normed)?;
    output(LinearRole::Up, &up);
    let mut hidden = vec![0.0; gate.len()];
    dev.silu_mul(&gate, &up, &mut hidden)?;
    Ok(hidden)
}

// ---------------------------------------------------------------------------------------------
// The whole model

/// A model ready to run: its family and the top-level tensors (block weights are loaded one
/// at a time with [`Decoder::load_block`]).
#[derive(Debug)]
pub struct Decoder<'m> {
    pub model: &'m Model,
    pub family: Family,
}

impl<'m> Decoder<'m> {
    /// The model's family from config.json's `architectures`.
    pub fn new(model: &'m Model) -> Result<Decoder<'m>, ForwardError> {
        let family = family_for(
            &model.config.architectures,
            &model.config.path.display().to_string(),
        )?;
        Ok(Decoder { model, family })
    }

    fn cfg(&self) -> &ModelConfig {
        &self.model.config
    }

    /// Token embeddings `[T, H]` of `ids` (see [`embed_tokens`]).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, ForwardError> {
        embed_tokens(self.cfg(), &self.family, &self.model.weights, ids)
    }

    /// Block `i`'s weights in f32.
    pub fn load_block(&self, i: usize) -> Result<BlockWeights<'static>, ForwardError> {
        BlockWeights::load(self.model, &self.family, i)
    }

    /// The final RMSNorm of the residual stream: `[T, H]` → `[T, H]`.
    pub fn final_norm(&self, dev: &dyn Device, h: &[f32]) -> Result<Vec<f32>, ForwardError> {
        let name = self.family.final_norm_weight();
        let hidden = self.cfg().hidden_size;
        let w = read_tensor(
            self.cfg(),
            &self.model.weights,
            &name,
            "final norm",
            &[hidden],
        )?;
        rms_norm(dev, h, &w, self.cfg().rms_norm_eps as f32)
    }

    /// Logits `[T, V]` of the final-normed states `x: [T, H]`; the embedding is the output
    /// matrix when config.json sets `tie_word_embeddings`.
    pub fn lm_head(&self, dev: &dyn Device, x: &[f32]) -> Result<Vec<f32>, ForwardError> {
        let cfg = self.cfg();
        let name = self.family.lm_head_weight(cfg.tie_word_embeddings);
        let what = if cfg.tie_word_embeddings {
            "output projection (tied to the embedding)"
        } else {
            "output projection"
        };
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let w = read_tensor(cfg, &self.model.weights, &name, what, &[vocab, hidden])?;
        Linear::new(w, None, vocab, hidden)?.forward(dev, x)
    }

    /// Logits `[T, V]` of `n_seq` independent sequences of `seqlen` tokens (`ids: [T]`).
    pub fn logits(
        &self,
        dev: &dyn Device,
        ids: &[u32],
        n_seq: usize,
        seqlen: usize,
    ) -> Result<Vec<f32>, ForwardError> {
        check_len("token ids", ids.len(), n_seq * seqlen, || {
            format!("[n_seq={n_seq} · seqlen={seqlen}]")
        })?;
        let mut h = self.embed(ids)?;
        for i in 0..self.cfg().num_hidden_layers {
            let w = self.load_block(i)?;
            block_forward(dev, self.cfg(), &w, &mut h, n_seq, seqlen, &mut |_, _| {})?;
        }
        let x = self.final_norm(dev, &h)?;
        self.lm_head(dev, &x)
    }
}

/// Token embeddings `[T, H]`: the rows of `embed_tokens` for `ids` (from a memory-mapped
/// checkpoint only those rows are read and converted).
pub fn embed_tokens(
    cfg: &ModelConfig,
    family: &Family,
    src: &dyn TensorSource,
    ids: &[u32],
) -> Result<Vec<f32>, ForwardError> {
    let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
    if let Some((position, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        return Err(ForwardError::TokenOutOfRange {
            id,
            position,
            vocab,
        });
    }
    let name = family.embed_tokens_weight();
    let what = "token embedding";
    let rows: Vec<usize> = ids.iter().map(|&id| id as usize).collect();
    let t = src
        .rows_f32(&name, &rows)?
        .ok_or_else(|| ForwardError::MissingTensor {
            tensor: name.clone(),
            what: what.to_string(),
            dir: src.dir(),
        })?;
    check_shape(cfg, &name, what, &t.shape, &[vocab, hidden])?;
    Ok(t.values)
}

/// Logits `[T, V]` of one sequence `ids: [T]` on the CPU.
pub fn forward_logits(model: &Model, ids: &[u32]) -> Result<Vec<f32>, ForwardError> {
    Decoder::new(model)?.logits(&CpuDevice::new(), ids, 1, ids.len())
}

fn check_shape(
    cfg: &ModelConfig,
    name: &str,
    what: &str,
    found: &[usize],
    expected: &[usize],
) -> Result<(), ForwardError> {
    if found == expected {
        Ok(())
    } else {
        Err(ForwardError::Shape {
            tensor: name.to_string(),
            what: what.to_string(),
            found: found.to_vec(),
            expected: expected.to_vec(),
            config: cfg.path.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::path::Path;

    use safetensors::{Dtype, SafeTensors};
    use serde_json::json;

    use super::*;
    use crate::model::testutil::{write_model, Spec, TensorSpec};
    use crate::model::{f32_to_dtype_bytes, DType};

    /// `shared/` beside the repository (CI checks it out there too).
    fn shared() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn argmax_rows(x: &[f32], width: usize) -> Vec<usize> {
        x.chunks_exact(width)
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                        if v > best.1 {
                            (i, v)
                        } else {
                            best
                        }
                    })
                    .0
            })
            .collect()
    }

    /// transformers' outputs for one sequence (see shared/reference/README.md).
    struct Reference {
        bytes: Vec<u8>,
    }

    impl Reference {
        fn open(path: &Path) -> Reference {
            Reference {
                bytes: std::fs::read(path).unwrap(),
            }
        }

        fn ids(&self) -> Vec<u32> {
            let st = SafeTensors::deserialize(&self.bytes).unwrap();
            let t = st.tensor("input_ids").unwrap();
            assert_eq!(t.dtype(), Dtype::I64);
            t.data()
                .chunks_exact(8)
                .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
                .collect()
        }

        fn f32(&self, name: &str) -> Vec<f32> {
            let st = SafeTensors::deserialize(&self.bytes).unwrap();
            let t = st.tensor(name).unwrap();
            assert_eq!(t.dtype(), Dtype::F32, "{name}");
            t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }
    }

    /// Runs the model block by block against the reference; returns (per block: max abs error
    /// and max |reference|; final-norm max abs error; logits max abs error) after checking the
    /// argmax of every position.
    fn compare_with_reference(model: &Model, reference: &Reference) -> (Vec<(f32, f32)>, f32, f32) {
        let dev = CpuDevice::new();
        let dec = Decoder::new(model).unwrap();
        let ids = reference.ids();
        let t = ids.len();
        let mut h = dec.embed(&ids).unwrap();
        assert_eq!(
            h,
            reference.f32("embeddings"),
            "embeddings are a plain copy"
        );
        let mut block_errors = Vec::new();
        for i in 0..model.config.num_hidden_layers {
            let w = dec.load_block(i).unwrap();
            block_forward(&dev, &model.config, &w, &mut h, 1, t, &mut |_, _| {}).unwrap();
            let want = reference.f32(&format!("block_out.{i}"));
            // With the largest |value|: SmolLM2's residual stream reaches 2.4e4.
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            block_errors.push((max_abs_diff(&h, &want), scale));
        }
        let x = dec.final_norm(&dev, &h).unwrap();
        let norm_error = max_abs_diff(&x, &reference.f32("final_norm"));
        let logits = dec.lm_head(&dev, &x).unwrap();
        let want = reference.f32("logits");
        let logits_error = max_abs_diff(&logits, &want);
        let v = model.config.vocab_size;
        assert_eq!(argmax_rows(&logits, v), argmax_rows(&want, v), "argmax");
        (block_errors, norm_error, logits_error)
    }

    #[test]
    fn stories260k_matches_transformers() {
        let model = Model::open(&shared().join("models/stories260K")).unwrap();
        let reference =
            Reference::open(&shared().join("reference/stories260K/forward.safetensors"));
        let (blocks, norm, logits) = compare_with_reference(&model, &reference);
        eprintln!(
            "stories260K: blocks (max abs error, max |ref|) {blocks:?}, \
             final_norm max abs error {norm:e}, logits max abs error {logits:e}"
        );
        assert_eq!(reference.ids().len(), 84);
        for (i, (e, _)) in blocks.iter().enumerate() {
            assert!(*e < 1e-4, "block {i}: {e}");
        }
        assert!(norm < 1e-4, "final norm: {norm}");
        assert!(logits < 1e-3, "logits: {logits}");

        // The one-call API computes the same thing.
        let ids = reference.ids();
        let all = forward_logits(&model, &ids).unwrap();
        assert!(max_abs_diff(&all, &reference.f32("logits")) < 1e-3);
    }

    /// Opt-in (needs the SmolLM2 shards, made by shared/models/SmolLM2-135M-q41dq/fetch.sh):
    /// `GS_SMOLLM2_DIR=/path/to/smollm2 cargo test -p gs-host --lib smollm2 -- --ignored`.
    #[test]
    #[ignore = "needs GS_SMOLLM2_DIR with the SmolLM2-135M-q41dq shards"]
    fn smollm2_matches_transformers() {
        let dir = std::env::var_os("GS_SMOLLM2_DIR").expect("set GS_SMOLLM2_DIR");
        let model = Model::open(Path::new(&dir)).unwrap();
        assert!(model.config.tie_word_embeddings);
        let reference =
            Reference::open(&shared().join("reference/SmolLM2-135M-q41dq/forward.safetensors"));
        let (blocks, norm, logits) = compare_with_reference(&model, &reference);
        // Relative to the block's largest |value| (the residual stream reaches 2.4e4).
        let worst = blocks.iter().map(|(e, m)| e / m).fold(0.0, f32::max);
        eprintln!(
            "SmolLM2: blocks (max abs error, max |ref|) {blocks:?}; worst relative {worst:e}; \
             final_norm max abs error {norm:e}, logits max abs error {logits:e}"
        );
        assert!(worst < 1e-5, "blocks: {blocks:?}");
        assert!(norm < 1e-3, "final norm: {norm}");
        assert!(logits < 1e-2, "logits: {logits}");
    }

    #[test]
    fn taps_are_the_subset_inputs_and_the_modules_compose_the_block() {
        let model = Model::open(&shared().join("models/stories260K")).unwrap();
        let (cfg, dev) = (&model.config, CpuDevice::new());
        let dec = Decoder::new(&model).unwrap();
        let (n_seq, seqlen) = (2, 9);
        let ids: Vec<u32> = (0..18).map(|i| (i * 37 + 5) % 512).collect();
        let h0 = dec.embed(&ids).unwrap();
        let w = dec.load_block(1).unwrap();
        let mut seen: Vec<(Tap, Vec<f32>)> = Vec::new();
        let mut h = h0.clone();
        block_forward(&dev, cfg, &w, &mut h, n_seq, seqlen, &mut |t, x| {
            seen.push((t, x.to_vec()))
        })
        .unwrap();
        let taps: Vec<Tap> = seen.iter().map(|s| s.0).collect();
        assert_eq!(taps, Tap::ALL);
        let widths: Vec<usize> = seen.iter().map(|s| s.1.len() / 18).collect();
        assert_eq!(widths, [64, 64, 64, 172]);

        // Recompose: h1 = h0 + attention(input_norm(h0)); h = h1 + mlp(post_norm(h1)).
        let eps = cfg.rms_norm_eps as f32;
        assert_eq!(seen[0].1, rms_norm(&dev, &h0, &w.input_norm, eps).unwrap());
        let attn = attention_forward(&dev, cfg, &w, &seen[0].1, n_seq, seqlen).unwrap();
        let ctx = attention_context(&dev, cfg, &w, &seen[0].1, n_seq, seqlen).unwrap();
        assert_eq!(ctx, seen[1].1);
        assert_eq!(attn, w.o.forward(&dev, &ctx).unwrap());
        let h1: Vec<f32> = h0.iter().zip(&attn).map(|(a, b)| a + b).collect();
        assert_eq!(
            seen[2].1,
            rms_norm(&dev, &h1, &w.post_attention_norm, eps).unwrap()
        );
        assert_eq!(mlp_hidden(&dev, &w, &seen[2].1).unwrap(), seen[3].1);
        let mlp = mlp_forward(&dev, &w, &seen[2].1).unwrap();
        let h2: Vec<f32> = h1.iter().zip(&mlp).map(|(a, b)| a + b).collect();
        assert_eq!(h, h2);

        // Sequences are independent: the second one alone gives the same result.
        let mut h_b = h0[9 * 64..].to_vec();
        block_forward(&dev, cfg, &w, &mut h_b, 1, seqlen, &mut |_, _| {}).unwrap();
        assert!(max_abs_diff(&h_b, &h[9 * 64..]) < 1e-6);
    }

    #[test]
    fn a_resumed_forward_continues_exactly_where_it_stopped() {
        let model = Model::open(&shared().join("models/stories260K")).unwrap();
        let (cfg, dev) = (&model.config, CpuDevice::new());
        let dec = Decoder::new(&model).unwrap();
        let (n_seq, seqlen) = (2, 9);
        let ids: Vec<u32> = (0..18).map(|i| (i * 29 + 3) % 512).collect();
        let h0 = dec.embed(&ids).unwrap();
        let w = dec.load_block(0).unwrap();
        let mut straight: Vec<(Tap, Vec<f32>)> = Vec::new();
        let mut h = h0.clone();
        block_forward(&dev, cfg, &w, &mut h, n_seq, seqlen, &mut |t, x| {
            straight.push((t, x.to_vec()))
        })
        .unwrap();
        let last = Tap::MlpHidden;
        for stop in Tap::ALL {
            // Stop at `stop`, then resume to the last tap: the taps after the stop (and the
            // stop again) are the straight forward's, bit for bit.
            let mut h = h0.clone();
            let x = block_forward_resume(
                &dev,
                cfg,
                &w,
                &mut h,
                None,
                n_seq,
                seqlen,
                stop,
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!(x, straight[stop.rank()].1, "{stop:?}");
            let mut seen = Vec::new();
            let end = block_forward_resume(
                &dev,
                cfg,
                &w,
                &mut h,
                Some((stop, x)),
                n_seq,
                seqlen,
                last,
                &mut |t, x| seen.push((t, x.to_vec())),
            )
            .unwrap();
            assert_eq!(seen, straight[stop.rank()..], "resumed at {stop:?}");
            assert_eq!(end, straight[last.rank()].1);
        }
        // A forward cannot go back to an earlier tap.
        let mut h = h0.clone();
        let x = straight[Tap::MlpInput.rank()].1.clone();
        let err = block_forward_resume(
            &dev,
            cfg,
            &w,
            &mut h,
            Some((Tap::MlpInput, x)),
            n_seq,
            seqlen,
            Tap::AttnContext,
            &mut |_, _| {},
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a block forward resumed at tap `mlp_input` cannot stop at the earlier tap `attn_context`"
        );
    }

    #[test]
    fn a_candidate_linear_is_swapped_in_without_copying_the_block() {
        let model = Model::open(&shared().join("models/stories260K")).unwrap();
        let dev = CpuDevice::new();
        let w = Decoder::new(&model).unwrap().load_block(0).unwrap();
        let x: Vec<f32> = (0..3 * 64)
            .map(|i| ((i * 13) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let base = mlp_forward(&dev, &w, &x).unwrap();
        let view = w.borrowed();
        assert!(matches!(view.gate.weight, Cow::Borrowed(_)));
        assert_eq!(mlp_forward(&dev, &view, &x).unwrap(), base);

        // down = 2·W_down doubles the MLP output; the original is untouched.
        let doubled: Vec<f32> = w.down.weight.iter().map(|v| 2.0 * v).collect();
        let mut cand = w.borrowed();
        *cand.linear_mut(LinearRole::Down) = Linear::new(&doubled[..], None, 64, 172).unwrap();
        let out = mlp_forward(&dev, &cand, &x).unwrap();
        assert!(out
            .iter()
            .zip(&base)
            .all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)));
        assert_eq!(mlp_forward(&dev, &w, &x).unwrap(), base);
        assert_eq!(cand.linear(LinearRole::Gate), &w.gate.borrowed());
        assert!(Linear::new(&doubled[1..], None, 64, 172).is_err());
    }

    /// Records every tensor name asked for.
    struct Recording<'a> {
        inner: &'a Weights,
        asked: RefCell<Vec<String>>,
    }

    impl TensorSource for Recording<'_> {
        fn tensor_f32(&self, name: &str) -> Result<Option<TensorF32<'_>>, ModelError> {
            self.asked.borrow_mut().push(name.to_string());
            self.inner.tensor_f32(name)
        }
        fn dir(&self) -> PathBuf {
            TensorSource::dir(self.inner)
        }
    }

    #[test]
    fn loading_a_block_reads_only_its_tensors() {
        let model = Model::open(&shared().join("models/stories260K")).unwrap();
        let family = Decoder::new(&model).unwrap().family;
        let src = Recording {
            inner: &model.weights,
            asked: RefCell::new(Vec::new()),
        };
        let w = BlockWeights::load_from(&model.config, &family, 3, &src)
            .unwrap()
            .into_owned();
        let asked = src.asked.into_inner();
        assert_eq!(asked.len(), 9, "{asked:?}");
        assert!(
            asked.iter().all(|n| n.starts_with("model.layers.3.")),
            "{asked:?}"
        );
        assert_eq!(w.block, 3);
        assert_eq!(
            w.q.weight.as_ref(),
            model
                .weights
                .to_f32("model.layers.3.self_attn.q_proj.weight")
                .unwrap()
        );
        assert_eq!((w.k.out_features, w.k.in_features), (32, 64));
        assert!(w.q.bias.is_none() && w.q_norm.is_none());
        let e = BlockWeights::load(&model, &family, 5)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("block 5 does not exist") && e.contains("num_hidden_layers = 5"),
            "{e}"
        );
    }

    #[test]
    fn rope_frequencies_follow_transformers() {
        let mut cfg = Model::open(&shared().join("models/stories260K"))
            .unwrap()
            .config;
        // θ = 10000, D = 8: θ^(-2i/8) = 1, 0.1, 0.01, 0.001.
        let f = rope_inv_freq(&cfg);
        for (got, want) in f.iter().zip([1.0f32, 0.1, 0.01, 0.001]) {
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON * want,
                "{got} vs {want}"
            );
        }
        let t = RopeTables::new(&cfg, 5);
        assert_eq!((t.cos.len(), t.sin.len()), (40, 40));
        assert_eq!(&t.cos[..8], &[1.0; 8]); // position 0: no rotation
        assert_eq!(&t.sin[..8], &[0.0; 8]);
        for p in 0..5 {
            for (j, fj) in f.iter().enumerate() {
                assert_eq!(t.cos[p * 8 + j], t.cos[p * 8 + j + 4]); // cat(freqs, freqs)
                assert_eq!(t.sin[p * 8 + j], (p as f32 * fj).sin());
            }
        }

        cfg.rope_scaling = RopeScaling::Linear { factor: 4.0 };
        let lin = rope_inv_freq(&cfg);
        assert!(lin.iter().zip(&f).all(|(a, b)| *a == b / 4.0));

        // Llama 3.1's rule: θ = 500000, D = 128, factor 8, low 1, high 4, original 8192.
        cfg.rope_theta = 500000.0;
        cfg.head_dim = 128;
        cfg.rope_scaling = RopeScaling::None;
        let plain = rope_inv_freq(&cfg);
        cfg.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let scaled = rope_inv_freq(&cfg);
        let (mut kept, mut slowed, mut blended) = (0, 0, 0);
        for (s, p) in scaled.iter().zip(&plain) {
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(*p);
            let want = if wavelen < 8192.0 / 4.0 {
                kept += 1;
                f64::from(*p)
            } else if wavelen > 8192.0 {
                slowed += 1;
                f64::from(*p) / 8.0
            } else {
                blended += 1;
                let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - smooth) * f64::from(*p) / 8.0 + smooth * f64::from(*p)
            };
            assert!((f64::from(*s) - want).abs() <= 1e-6 * want, "{s} vs {want}");
        }
        assert!(
            kept > 0 && slowed > 0 && blended > 0,
            "{kept} {slowed} {blended}"
        );
        assert_eq!(kept + slowed + blended, 64);
    }

    // --- Tiny Qwen2 / Qwen3 / Llama models against a plain f64 transcription of transformers.

    const HID: usize = 16;
    const NH: usize = 4;
    const NKV: usize = 2;
    const HD: usize = 8; // explicit head_dim: NH·HD = 32 ≠ HID, as in Qwen3
    const FFN: usize = 24;
    const VOCAB: usize = 32;
    const LAYERS: usize = 2;

    /// Deterministic values in about [-0.5, 0.5).
    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 1009) as f32 / 1009.0 - 0.5)
            .collect()
    }

    fn tiny_spec(arch: &str, extra: serde_json::Value, biases: &[&str], qk_norm: bool) -> Spec {
        let mut config = json!({
            "architectures": [arch],
            "model_type": "tiny",
            "num_hidden_layers": LAYERS,
            "hidden_size": HID,
            "intermediate_size": FFN,
            "num_attention_heads": NH,
            "num_key_value_heads": NKV,
            "head_dim": HD,
            "vocab_size": VOCAB,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000.0,
            "tie_word_embeddings": true
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![VOCAB, HID]),
            ("model.norm.weight".into(), vec![HID]),
        ];
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            for (m, shape) in [
                ("self_attn.q_proj", vec![NH * HD, HID]),
                ("self_attn.k_proj", vec![NKV * HD, HID]),
                ("self_attn.v_proj", vec![NKV * HD, HID]),
                ("self_attn.o_proj", vec![HID, NH * HD]),
                ("mlp.gate_proj", vec![FFN, HID]),
                ("mlp.up_proj", vec![FFN, HID]),
                ("mlp.down_proj", vec![HID, FFN]),
            ] {
                if biases.iter().any(|b| m.ends_with(b)) {
                    shapes.push((format!("{p}.{m}.bias"), vec![shape[0]]));
                }
                shapes.push((format!("{p}.{m}.weight"), shape));
            }
            shapes.push((format!("{p}.input_layernorm.weight"), vec![HID]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![HID]));
            if qk_norm {
                shapes.push((format!("{p}.self_attn.q_norm.weight"), vec![HD]));
                shapes.push((format!("{p}.self_attn.k_norm.weight"), vec![HD]));
            }
        }
        let tensors = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let mut v = vals(shape.iter().product(), i + 1);
                if name.contains("norm") {
                    v.iter_mut().for_each(|x| *x += 1.0); // norms near 1, like trained ones
                }
                TensorSpec {
                    name,
                    dtype: DType::BF16,
                    bytes: f32_to_dtype_bytes(&v, DType::BF16).unwrap(),
                    shape,
                    shard: 0,
                }
            })
            .collect();
        Spec {
            config,
            tensors,
            shard_names: vec!["model.safetensors".into()],
            extra_files: Vec::new(),
        }
    }

    /// transformers' decoder, transcribed in f64 loops, reading tensors by their HF names.
    fn naive_logits(model: &Model, ids: &[u32], qk_norm: bool) -> Vec<f64> {
        let w = |n: &str| -> Vec<f64> {
            model
                .weights
                .to_f32(n)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        };
        let has = |n: &str| model.weights.contains(n);
        let t = ids.len();
        let eps = 1e-6;
        let norm = |x: &[f64], g: &[f64]| -> Vec<f64> {
            x.chunks(g.len())
                .flat_map(|r| {
                    let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
                    let s = 1.0 / (ms + eps).sqrt();
                    r.iter()
                        .zip(g)
                        .map(move |(v, g)| v * s * g)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let linear = |x: &[f64], name: &str, out: usize, bias: bool| -> Vec<f64> {
            let wt = w(&format!("{name}.weight"));
            let b = if bias {
                w(&format!("{name}.bias"))
            } else {
                vec![0.0; out]
            };
            let inp = wt.len() / out;
            x.chunks(inp)
                .flat_map(|r| {
                    (0..out)
                        .map(|o| b[o] + (0..inp).map(|i| r[i] * wt[o * inp + i]).sum::<f64>())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let rope = |x: &mut [f64], heads: usize| {
            for p in 0..t {
                for h in 0..heads {
                    let v = &mut x[(p * heads + h) * HD..(p * heads + h + 1) * HD];
                    for j in 0..HD / 2 {
                        let a = p as f64 * 1000f64.powf(-2.0 * j as f64 / HD as f64);
                        let (x1, x2) = (v[j], v[j + HD / 2]);
                        v[j] = x1 * a.cos() - x2 * a.sin();
                        v[j + HD / 2] = x2 * a.cos() + x1 * a.sin();
                    }
                }
            }
        };
        let emb = w("model.embed_tokens.weight");
        let mut h: Vec<f64> = ids
            .iter()
            .flat_map(|&i| emb[i as usize * HID..(i as usize + 1) * HID].to_vec())
            .collect();
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            let x = norm(&h, &w(&format!("{p}.input_layernorm.weight")));
            let b = |m: &str| has(&format!("{p}.self_attn.{m}.bias"));
            let mut q = linear(&x, &format!("{p}.self_attn.q_proj"), NH * HD, b("q_proj"));
            let mut k = linear(&x, &format!("{p}.self_attn.k_proj"), NKV * HD, b("k_proj"));
            let v = linear(&x, &format!("{p}.self_attn.v_proj"), NKV * HD, b("v_proj"));
            if qk_norm {
                q = norm(&q, &w(&format!("{p}.self_attn.q_norm.weight")));
                k = norm(&k, &w(&format!("{p}.self_attn.k_norm.weight")));
            }
            rope(&mut q, NH);
            rope(&mut k, NKV);
            let mut ctx = vec![0.0; t * NH * HD];
            for hq in 0..NH {
                let g = hq / (NH / NKV);
                for i in 0..t {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..HD)
                                .map(|c| q[(i * NH + hq) * HD + c] * k[(j * NKV + g) * HD + c])
                                .sum::<f64>()
                                / (HD as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    for c in 0..HD {
                        ctx[(i * NH + hq) * HD + c] = (0..=i)
                            .map(|j| (s[j] - m).exp() / z * v[(j * NKV + g) * HD + c])
                            .sum();
                    }
                }
            }
            let o = linear(&ctx, &format!("{p}.self_attn.o_proj"), HID, b("o_proj"));
            h.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let x = norm(&h, &w(&format!("{p}.post_attention_layernorm.weight")));
            let mb = |m: &str| has(&format!("{p}.mlp.{m}.bias"));
            let gate = linear(&x, &format!("{p}.mlp.gate_proj"), FFN, mb("gate_proj"));
            let up = linear(&x, &format!("{p}.mlp.up_proj"), FFN, mb("up_proj"));
            let m: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = linear(&m, &format!("{p}.mlp.down_proj"), HID, mb("down_proj"));
            h.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        let x = norm(&h, &w("model.norm.weight"));
        linear(&x, "model.embed_tokens", VOCAB, false)
    }

    fn check_tiny(spec: Spec, qk_norm: bool) {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &spec);
        let model = Model::open(dir.path()).unwrap();
        let dec = Decoder::new(&model).unwrap();
        let ids: Vec<u32> = (0..14).map(|i| (i * 11 + 3) % VOCAB as u32).collect();
        let want: Vec<f64> = [&ids[..7], &ids[7..]]
            .iter()
            .flat_map(|s| naive_logits(&model, s, qk_norm))
            .collect();
        let got = dec.logits(&CpuDevice::new(), &ids, 2, 7).unwrap();
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-4, "{}: {err}", dec.family.family);
    }

    #[test]
    fn qwen3_with_qk_norm_and_attention_bias_matches_the_definition() {
        let spec = tiny_spec(
            "Qwen3ForCausalLM",
            json!({"attention_bias": true}),
            &["q_proj", "k_proj", "v_proj", "o_proj"],
            true,
        );
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &spec);
        let model = Model::open(dir.path()).unwrap();
        let w = Decoder::new(&model).unwrap().load_block(1).unwrap();
        assert!(w.q_norm.is_some() && w.k_norm.is_some() && w.o.bias.is_some());
        assert!(w.gate.bias.is_none());
        check_tiny(spec, true);
    }

    #[test]
    fn qwen2_with_qkv_biases_matches_the_definition() {
        let spec = tiny_spec(
            "Qwen2ForCausalLM",
            json!({}),
            &["q_proj", "k_proj", "v_proj"],
            false,
        );
        check_tiny(spec, false);
    }

    #[test]
    fn llama_with_mlp_bias_matches_the_definition() {
        let spec = tiny_spec(
            "LlamaForCausalLM",
            json!({"mlp_bias": true}),
            &["gate_proj", "up_proj", "down_proj"],
            false,
        );
        check_tiny(spec, false);
    }

    #[test]
    fn unused_bias_tensors_are_ignored_like_transformers() {
        // A Mistral checkpoint with stray biases: MistralAttention has none, so they are unused.
        let spec = tiny_spec("MistralForCausalLM", json!({}), &["q_proj"], false);
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &spec);
        let model = Model::open(dir.path()).unwrap();
        let w = Decoder::new(&model).unwrap().load_block(0).unwrap();
        assert!(w.q.bias.is_none());
    }

    #[test]
    fn errors_name_the_tensor_and_the_reason() {
        // Qwen2 without its q/k/v biases.
        let dir = tempfile::tempdir().unwrap();
        write_model(
            dir.path(),
            &tiny_spec("Qwen2ForCausalLM", json!({}), &[], false),
        );
        let model = Model::open(dir.path()).unwrap();
        let dec = Decoder::new(&model).unwrap();
        let e = dec.load_block(0).unwrap_err().to_string();
        assert!(
            e.contains("\"model.layers.0.self_attn.q_proj.bias\"")
                && e.contains("qwen2 family always has it"),
            "{e}"
        );

        // A weight whose shape disagrees with config.json.
        let mut spec = tiny_spec("LlamaForCausalLM", json!({}), &[], false);
        let t = spec
            .tensors
            .iter_mut()
            .find(|t| t.name == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        t.shape = vec![HID, FFN];
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &spec);
        let model = Model::open(dir.path()).unwrap();
        let dec = Decoder::new(&model).unwrap();
        let e = dec.load_block(1).unwrap_err().to_string();
        assert!(
            e.contains("\"model.layers.1.mlp.up_proj.weight\"")
                && e.contains("[16, 24]")
                && e.contains("expected [24, 16]")
                && e.contains("config.json"),
            "{e}"
        );

        let dev = CpuDevice::new();
        let e = dec.embed(&[1, 99]).unwrap_err().to_string();
        assert!(
            e.contains("token id 99 at position 1") && e.contains("32"),
            "{e}"
        );
        let e = dec.logits(&dev, &[1, 2, 3], 2, 2).unwrap_err().to_string();
        assert!(e.contains("token ids has 3 elements, expected 4"), "{e}");
        let w = dec.load_block(0).unwrap();
        let e = block_forward(
            &dev,
            &model.config,
            &w,
            &mut [0.0; 15],
            1,
            1,
            &mut |_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("hidden states has 15 elements, expected 16"),
            "{e}"
        );

        // Sliding-window attention is refused beyond the window, not silently ignored.
        let mut cfg = model.config.clone();
        cfg.sliding_window = Some(4);
        let x = vec![0.1; 5 * HID];
        let e = attention_forward(&dev, &cfg, &w, &x, 1, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sliding window of 4"), "{e}");
        assert!(attention_forward(&dev, &cfg, &w, &x[..4 * HID], 1, 4).is_ok());

        // An architecture no family covers.
        let dir = tempfile::tempdir().unwrap();
        write_model(
            dir.path(),
            &tiny_spec("GPT2LMHeadModel", json!({}), &[], false),
        );
        let model = Model::open(dir.path()).unwrap();
        let e = Decoder::new(&model).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
    }
}
