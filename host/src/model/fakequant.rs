//! The fake-quant linear wrapper: quantize-dequantize of a linear layer's input, as the scheme
//! says, so evaluation and the sequential scheduler see what a quantized engine computes.
//!
//! Weights need no wrapper: the pipeline's weights already are quantize-dequantize results
//! (see `export::QuantLayer`). Activations are quantized at run time, so the forward pass
//! applies an [`ActQuant`] to the input of every linear that has one.

use gs_quant::{
    compute_qparams, fake_quantize_per_token, fake_quantize_with, ActArgs, Granularity, QParams,
    QuantArgs, QuantError, QuantType, ScaleRule,
};

/// How the input `x: [tokens, in]` of one linear layer is quantized at inference time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActQuant {
    /// Scales computed from the input itself: per token (`Granularity::Channel`, one scale per
    /// row) or per tensor (one scale for the whole input of the call).
    Dynamic(QuantArgs),
    /// A calibrated per-tensor scale and zero point (0 when symmetric), stored in the checkpoint.
    Static {
        args: QuantArgs,
        scale: f32,
        zero: i32,
    },
}

impl ActQuant {
    /// The quantizer of a scheme's activations: dynamic ones need nothing more; static ones need
    /// the calibrated `(scale, zero)`, `None` if not calibrated yet.
    pub fn from_scheme(act: &ActArgs, calibrated: Option<(f32, i32)>) -> Option<ActQuant> {
        if act.dynamic {
            let args = match act.args.granularity {
                // "token" is stored as Channel: one scale per row of the input.
                Granularity::Channel | Granularity::Group(_) => QuantArgs {
                    granularity: Granularity::Channel,
                    ..act.args
                },
                Granularity::Tensor => act.args,
            };
            return Some(ActQuant::Dynamic(args));
        }
        calibrated.map(|(scale, zero)| ActQuant::Static {
            args: act.args,
            scale,
            zero,
        })
    }

    /// The quantizer's args.
    pub fn args(&self) -> &QuantArgs {
        match self {
            ActQuant::Dynamic(a) | ActQuant::Static { args: a, .. } => a,
        }
    }

    /// `x̂ = Q(x)`: `x` is row-major `[tokens, cols]`.
    pub fn apply(&self, x: &[f32], cols: usize) -> Result<Vec<f32>, QuantError> {
        let tokens = x.len() / cols.max(1);
        match self {
            ActQuant::Dynamic(args) if args.granularity == Granularity::Tensor => {
                let qp = compute_qparams(x, 1, x.len(), args)?;
                fake_quantize_with(x, 1, x.len(), &qp, args)
            }
            ActQuant::Dynamic(args) => fake_quantize_per_token(x, tokens, cols, args),
            ActQuant::Static { args, scale, zero } => {
                let zeros = if args.symmetric { vec![] } else { vec![*zero] };
                let qp = QParams::new(Granularity::Tensor, tokens, cols, vec![*scale], zeros)?;
                fake_quantize_with(x, tokens, cols, &qp, args)
            }
        }
    }
}

/// The JSON form of an [`ActQuant`] in run records:
/// `{"dynamic": bool, "bits", "type": "int"|"float", "symmetric", "granularity":
/// "token"|"tensor", "scale_rule": "half_range"|"qmax", "scale"?, "zero"?}`.
pub fn act_quant_to_json(a: &ActQuant) -> serde_json::Value {
    let args = a.args();
    let mut v = serde_json::json!({
        "dynamic": matches!(a, ActQuant::Dynamic(_)),
        "bits": args.bits,
        "type": match args.ty { QuantType::Int => "int", QuantType::Float => "float" },
        "symmetric": args.symmetric,
        "granularity": match args.granularity { Granularity::Tensor => "tensor", _ => "token" },
        "scale_rule": match args.scale_rule { ScaleRule::HalfRange => "half_range", ScaleRule::Qmax => "qmax" },
    });
    if let ActQuant::Static { scale, zero, .. } = a {
        v["scale"] = serde_json::json!(scale);
        v["zero"] = serde_json::json!(zero);
    }
    v
}

/// Reads [`act_quant_to_json`]'s form back; the error names the bad field.
pub fn act_quant_from_json(v: &serde_json::Value) -> Result<ActQuant, String> {
    let field = |k: &str| v.get(k).ok_or_else(|| format!("missing `{k}`"));
    let bool_of = |k: &str| {
        field(k)?
            .as_bool()
            .ok_or_else(|| format!("`{k}` must be a boolean"))
    };
    let str_of = |k: &str| {
        field(k)?
            .as_str()
            .ok_or_else(|| format!("`{k}` must be a string"))
    };
    let bits = field("bits")?
        .as_u64()
        .filter(|b| (1..=8).contains(b))
        .ok_or("`bits` must be an integer in 1..=8")? as u8;
    let ty = match str_of("type")? {
        "int" => QuantType::Int,
        "float" => QuantType::Float,
        t => return Err(format!("unknown `type` {t:?}")),
    };
    let granularity = match str_of("granularity")? {
        "tensor" => Granularity::Tensor,
        "token" => Granularity::Channel,
        g => return Err(format!("unknown `granularity` {g:?}")),
    };
    let scale_rule = match str_of("scale_rule")? {
        "half_range" => ScaleRule::HalfRange,
        "qmax" => ScaleRule::Qmax,
        r => return Err(format!("unknown `scale_rule` {r:?}")),
    };
    let args = QuantArgs {
        bits,
        ty,
        symmetric: bool_of("symmetric")?,
        granularity,
        scale_rule,
    };
    args.validate().map_err(|e| e.to_string())?;
    if bool_of("dynamic")? {
        return Ok(ActQuant::Dynamic(args));
    }
    let scale = field("scale")?
        .as_f64()
        .map(|s| s as f32)
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or("`scale` must be a positive number")?;
    let zero = field("zero")?
        .as_i64()
        .and_then(|z| i32::try_from(z).ok())
        .ok_or("`zero` must be an integer")?;
    Ok(ActQuant::Static { args, scale, zero })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let a = ActQuant::Static {
            args: int8(false, Granularity::Tensor),
            scale: 0.012_345_678,
            zero: -7,
        };
        assert_eq!(act_quant_from_json(&act_quant_to_json(&a)).unwrap(), a);
        let d = ActQuant::Dynamic(int8(true, Granularity::Channel));
        assert_eq!(act_quant_from_json(&act_quant_to_json(&d)).unwrap(), d);
    }

    fn int8(symmetric: bool, granularity: Granularity) -> QuantArgs {
        QuantArgs {
            bits: 8,
            ty: QuantType::Int,
            symmetric,
            granularity,
            scale_rule: ScaleRule::HalfRange,
        }
    }

    #[test]
    fn static_asymmetric_uses_the_calibrated_scale_and_zero() {
        // q = clamp(round(x/s + zp), -128, 127), x̂ = (q - zp)·s (compressed-tensors
        // forward_helpers / msModelSlim int_quantization): with s = 0.5, zp = -3:
        // 1.0 → round(2 - 3) = -1 → (−1+3)·0.5 = 1.0; 0.3 → round(0.6 - 3) = round(-2.4) = -2 → 0.5;
        // 1000 → clamp(1997) = 127 → 65.0; -1000 → clamp(-2003) = -128 → -62.5.
        let a = ActQuant::Static {
            args: int8(false, Granularity::Tensor),
            scale: 0.5,
            zero: -3,
        };
        let y = a.apply(&[1.0, 0.3, 1000.0, -1000.0], 2).unwrap();
        assert_eq!(y, vec![1.0, 0.5, 65.0, -62.5]);
    }

    #[test]
    fn dynamic_per_token_scales_each_row_by_its_own_absmax() {
        // Row absmax 127.5 → s = 127.5/127.5 = 1 (half-range rule): 0.4 → 0;
        // row 2 absmax 2.55 → s = 0.02: 1.0 → 50 → 1.0.
        let a = ActQuant::from_scheme(
            &ActArgs {
                args: int8(true, Granularity::Channel),
                dynamic: true,
            },
            None,
        )
        .unwrap();
        let y = a.apply(&[127.5, 0.4, 2.55, 1.0], 2).unwrap();
        assert_eq!(y[1], 0.0);
        assert!((y[3] - 1.0).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn a_static_scheme_without_calibration_has_no_quantizer() {
        let act = ActArgs {
            args: int8(false, Granularity::Tensor),
            dynamic: false,
        };
        assert_eq!(ActQuant::from_scheme(&act, None), None);
    }
}
