//! A quantized linear layer as an export writes it, and the one rule that makes the written
//! checkpoint and the fake-quant evaluation agree bit for bit.
//!
//! A plugin hands back fake-quantized weights `ŵ` and the qparams it used. [`QuantLayer::finalize`]
//! recovers the integer (or FP8) codes `q = Q(ŵ)` with those qparams, rounds the scales to the
//! dtype the format stores them in, and recomputes `ŵ' = (q − zp)·s'` the way the format's
//! decoder does. `ŵ'` is what evaluation, the sequential scheduler and the exporter all use, so
//! reload → decode gives exactly the weights that were evaluated.

use gs_quant::{
    dequantize_fp8, dequantize_int, quantize_fp8, quantize_int, QParams, QuantArgs, QuantType,
    ScaleDtype, Scheme,
};

use crate::model::fakequant::ActQuant;
use crate::model::DType;

/// Quantized values of a `[out, in]` weight, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum Codes {
    /// Signed integers in the scheme's range (`bits ≤ 8`).
    Int(Vec<i8>),
    /// FP8 E4M3 bit patterns.
    Fp8(Vec<u8>),
}

/// One quantized linear layer, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantLayer {
    /// Module name, e.g. `model.layers.0.self_attn.q_proj` (tensors are `<name>.weight`, …).
    pub name: String,
    /// The layer's scheme; `weights` is `Some`.
    pub scheme: Scheme,
    /// The weights' args (`scheme.weights`).
    pub weight_args: QuantArgs,
    /// dtype of `<name>.weight` in the source checkpoint (the "model dtype" of the formats).
    pub weight_dtype: DType,
    pub out_features: usize,
    pub in_features: usize,
    /// `[out, in]`.
    pub codes: Codes,
    /// Scales already rounded to the format's scale dtype; zero points when asymmetric.
    pub qparams: QParams,
    /// The current bias `[out]` (a smoothing stage may have changed it), with its source dtype.
    pub bias: Option<(Vec<f32>, DType)>,
    /// How the layer's input is quantized (static ones carry the calibrated scale and zero).
    pub input: Option<ActQuant>,
    /// `(q − zp)·s` as the format's decoder computes it: what evaluation uses.
    pub dequantized: Vec<f32>,
}

/// What a format prescribes for the numbers of a quantized layer.
#[derive(Debug, Clone, Copy)]
pub struct NumberRules {
    /// dtype the format stores weight scales (and static input scales) in, for a layer whose
    /// weight is stored in `weight_dtype` in the source.
    pub scale_dtype: fn(DType) -> ScaleDtype,
    /// dtype the format's decoder produces `(q − zp)·s` in (`None`: f32).
    pub dequant_dtype: fn(DType) -> Option<ScaleDtype>,
}

/// Why a layer cannot be finalized.
#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    #[error("{layer}: {message}")]
    Quant { layer: String, message: String },
    #[error("{layer}: the weights the pipeline produced are not on the grid of the qparams it set (element {index}: {value} is {distance:.3e} scales from the nearest grid point); the last quantizing stage must set the weights it quantized")]
    OffGrid {
        layer: String,
        index: usize,
        value: f32,
        distance: f32,
    },
}

/// `scale_dtype` of a layer stored as `dtype`: the model dtype when it is a float type the
/// formats know (compressed-tensors falls back to fp16 for anything else).
pub fn model_scale_dtype(dtype: DType) -> ScaleDtype {
    match dtype {
        DType::BF16 => ScaleDtype::BF16,
        DType::F32 | DType::F64 => ScaleDtype::F32,
        _ => ScaleDtype::F16,
    }
}

impl QuantLayer {
    /// Builds the layer from the pipeline's fake-quantized weights `w: [out, in]` and the
    /// qparams the last quantizing stage set (see the module docs).
    ///
    /// Fails when the qparams do not fit the scheme or `w` is not on their grid (a plugin that
    /// set qparams but not the weights it quantized with them).
    #[allow(clippy::too_many_arguments)]
    pub fn finalize(
        name: &str,
        scheme: Scheme,
        weight_dtype: DType,
        w: &[f32],
        plugin_qparams: &QParams,
        bias: Option<(Vec<f32>, DType)>,
        input: Option<ActQuant>,
        rules: &NumberRules,
    ) -> Result<QuantLayer, FinalizeError> {
        let quant = |e: gs_quant::QuantError| FinalizeError::Quant {
            layer: name.to_string(),
            message: e.to_string(),
        };
        let Some(args) = scheme.weights else {
            return Err(FinalizeError::Quant {
                layer: name.to_string(),
                message: "the layer's scheme does not quantize weights".into(),
            });
        };
        let (rows, cols) = (plugin_qparams.rows, plugin_qparams.cols);
        let codes = match args.ty {
            QuantType::Int => {
                Codes::Int(quantize_int(w, rows, cols, plugin_qparams, &args).map_err(quant)?)
            }
            QuantType::Float => {
                Codes::Fp8(quantize_fp8(w, rows, cols, plugin_qparams).map_err(quant)?)
            }
        };
        check_on_grid(name, w, &codes, plugin_qparams)?;
        let mut qparams = plugin_qparams.clone();
        qparams
            .round_scales((rules.scale_dtype)(weight_dtype))
            .map_err(quant)?;
        let mut dequantized = dequantize(&codes, &qparams).map_err(quant)?;
        if let Some(dt) = (rules.dequant_dtype)(weight_dtype) {
            dequantized.iter_mut().for_each(|v| *v = dt.round(*v));
        }
        Ok(QuantLayer {
            name: name.to_string(),
            scheme,
            weight_args: args,
            weight_dtype,
            out_features: rows,
            in_features: cols,
            codes,
            qparams,
            bias,
            input,
            dequantized,
        })
    }
}

/// `(q − zp)·s` of `codes` in f32.
pub fn dequantize(codes: &Codes, qp: &QParams) -> Result<Vec<f32>, gs_quant::QuantError> {
    match codes {
        Codes::Int(q) => dequantize_int(q, qp),
        Codes::Fp8(c) => dequantize_fp8(c, qp),
    }
}

/// Every `w` must be within a thousandth of a scale of its grid point `(q − zp)·s`: more
/// means the codes are not what the plugin meant (it returned unquantized weights).
fn check_on_grid(name: &str, w: &[f32], codes: &Codes, qp: &QParams) -> Result<(), FinalizeError> {
    let grid = dequantize(codes, qp).map_err(|e| FinalizeError::Quant {
        layer: name.to_string(),
        message: e.to_string(),
    })?;
    for (i, (&a, &b)) in w.iter().zip(&grid).enumerate() {
        let s = qp.scale_for(i / qp.cols, i % qp.cols);
        // FP8 spacing grows with magnitude: measure in units of the local grid step instead.
        let step = match codes {
            Codes::Int(_) => s,
            Codes::Fp8(_) => s * (b.abs() / s / 8.0).max(1.0 / 64.0),
        };
        let d = (a - b).abs() / step;
        if d > 1e-3 {
            return Err(FinalizeError::OffGrid {
                layer: name.to_string(),
                index: i,
                value: a,
                distance: d,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gs_quant::{fake_quantize, Granularity, ScaleRule};

    fn w4g(g: u32) -> Scheme {
        Scheme {
            weights: Some(QuantArgs {
                bits: 4,
                ty: QuantType::Int,
                symmetric: true,
                granularity: Granularity::Group(g),
                scale_rule: ScaleRule::HalfRange,
            }),
            ..Scheme::default()
        }
    }

    const BF16_RULES: NumberRules = NumberRules {
        scale_dtype: model_scale_dtype,
        dequant_dtype: |d| Some(model_scale_dtype(d)),
    };

    #[test]
    fn finalize_recovers_codes_and_rounds_scales_to_the_model_dtype() {
        let w: Vec<f32> = (0..32)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.0123)
            .collect();
        let args = w4g(8).weights.unwrap();
        let (fake, qp) = fake_quantize(&w, 2, 16, &args).unwrap();
        let l = QuantLayer::finalize(
            "m.q",
            w4g(8),
            DType::BF16,
            &fake,
            &qp,
            None,
            None,
            &BF16_RULES,
        )
        .unwrap();
        let Codes::Int(q) = &l.codes else { panic!() };
        // Codes are the plugin's: re-dequantizing them with its f32 scales gives its weights.
        assert_eq!(dequantize_int(q, &qp).unwrap(), fake);
        for (s, s0) in l.qparams.scales.iter().zip(&qp.scales) {
            assert_eq!(*s, half::bf16::from_f32(*s0).to_f32());
        }
        // ŵ' = bf16((q − 0)·s'), as torch multiplies two bf16 tensors: the product of a 4-bit
        // integer and a bf16 scale is exact in f32, then rounded once to bf16.
        for (i, v) in l.dequantized.iter().enumerate() {
            let s = l.qparams.scale_for(i / 16, i % 16);
            assert_eq!(*v, half::bf16::from_f32(f32::from(q[i]) * s).to_f32());
        }
    }

    #[test]
    fn weights_off_the_grid_are_refused() {
        let w: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
        let args = w4g(8).weights.unwrap();
        let (_, qp) = fake_quantize(&w, 1, 16, &args).unwrap();
        let e = QuantLayer::finalize("m.q", w4g(8), DType::F32, &w, &qp, None, None, &BF16_RULES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.q") && e.contains("not on the grid"), "{e}");
    }
}
