//! The Ascend operator-spec rules in one place: what the AscendV1 format and the NPU
//! operators it feeds (`npu_quant_matmul` for W8A8, `npu_dynamic_quant` + `npu_quant_matmul`
//! for W8A8_DYNAMIC, `npu_weight_quant_batchmatmul` for W8A16) can express, and the formulas
//! that fold quantization parameters into their inputs.
//!
//! Consulted by the pre-run validation of a manifest with `[export] format = "ascend"`
//! (`gs-host check` and every run: [`check_scheme`] per layer, [`check_plan`] across layers,
//! through `export::check_scheme`/`export::check_plan`), by the writer for every layer it
//! writes (the same functions plus [`check_group`], [`same_group_size`] and the formulas), and
//! by the reader (the formulas, to verify a checkpoint).
//!
//! The rules:
//! - int8 weights only, **symmetric** (8-bit full quantization: `npu_quant_matmul` has no
//!   weight offset; W8A16: the sign of CANN's antiquant offset is unverified), one scale per
//!   output channel, or per group for W8A16 only;
//! - one `group_size` for the whole model (the description has one), dividing every per-group
//!   layer's input width (no short last group in `weight_scale [out, in/group_size]`);
//! - W8A8: static per-tensor int8 activations; the **activation offset folds into
//!   `quant_bias`** ([`quant_bias`]), `deq_scale = input_scale · weight_scale`;
//! - W8A8_DYNAMIC: symmetric per-token int8 activations scaled by absmax/127 (qmax);
//! - no KV-cache quantization, no FP8, no activation quantization on float weights.

use gs_quant::{Granularity, QuantArgs, QuantType, ScaleRule, Scheme};

fn int8(symmetric: bool, granularity: Granularity) -> QuantArgs {
    QuantArgs {
        bits: 8,
        ty: QuantType::Int,
        symmetric,
        granularity,
        scale_rule: ScaleRule::Qmax,
    }
}

/// The input quantizer args of a decoded `W8A8` layer.
///
/// The format stores `input_scale` and `input_offset` and the device computes
/// `clamp(round(x/s + o), −128, 127)` whatever the calibration's symmetry was, and the
/// description has no place for that flag: static inputs are decoded as asymmetric always.
/// That gives the same numbers as symmetric args with the same scale when `o = 0`:
/// [`crate::model::fakequant::ActQuant::apply`] then passes `zeros = [0]` to
/// `gs_quant::fake_quantize_with`, which rounds `x/s + 0` into the same `[−128, 127]` range
/// (`int_range(8)` does not depend on symmetry) as symmetric qparams (`zeros = []`, zero 0).
/// The scale rule is irrelevant for a static quantizer (its scale is given); Qmax is
/// msModelSlim's.
pub(crate) fn static_input_args() -> QuantArgs {
    int8(false, Granularity::Tensor)
}

/// The input quantizer args of `W8A8_DYNAMIC`: `npu_dynamic_quant`, symmetric int8 per token,
/// `s = absmax/127` (the only dynamic scheme [`check_scheme`] accepts).
pub(crate) fn dynamic_input_args() -> QuantArgs {
    int8(true, Granularity::Channel)
}

/// Whole-model rules: the description has one `group_size`, so every per-group layer must use
/// the same one.
pub fn check_plan(layers: &[(String, Scheme)]) -> Result<(), String> {
    let mut first: Option<(u32, &str)> = None;
    for (name, scheme) in layers {
        if let Some(Granularity::Group(g)) = scheme.weights.map(|w| w.granularity) {
            same_group_size(first, name, g)?;
            first.get_or_insert((g, name));
        }
    }
    Ok(())
}

/// `layer` uses groups of `g`; `first` is the group size already chosen and the layer that
/// chose it.
pub fn same_group_size(first: Option<(u32, &str)>, layer: &str, g: u32) -> Result<(), String> {
    match first {
        Some((g0, other)) if g0 != g => Err(format!(
            "{other} uses groups of {g0} and {layer} groups of {g}, but quant_model_description.json has a single group_size; use one group size for every per-group layer"
        )),
        _ => Ok(()),
    }
}

/// Groups of `g` must divide the `inp` input columns: `weight_scale [out, in/group_size]` has
/// no short last group.
pub fn check_group(g: u32, inp: usize) -> Result<(), String> {
    let gs = g as usize;
    if gs == 0 || inp % gs != 0 {
        return Err(format!(
            "group size {g} does not divide the {inp} input columns; Ascend's weight_scale [out, in/group_size] has no short last group: choose a group size that divides every layer's input width"
        ));
    }
    Ok(())
}

/// Whether the Ascend format can express `scheme` for `layer`; the error names the layer, what
/// Ascend cannot express and what to use instead.
///
/// Accepted (what vLLM-Ascend's `w8a8_static`, `w8a8_dynamic` and `w8a16` methods load):
/// - `W8A8`: int8 symmetric per-channel weights, int8 static per-tensor activations
///   (symmetric or asymmetric);
/// - `W8A8_DYNAMIC`: int8 symmetric per-channel weights, int8 symmetric dynamic per-token
///   activations with `scale_rule = qmax`;
/// - `W8A16`: int8 symmetric weights, per channel or per group;
/// - `FLOAT`: a skipped layer (no weight quantization, no activation quantization).
pub fn check_scheme(layer: &str, scheme: &Scheme) -> Result<(), String> {
    let refuse = |what: &str, instead: &str| -> Result<(), String> {
        Err(format!(
            "{layer}: the Ascend format (msModelSlim AscendV1 for vLLM-Ascend / MindIE) cannot express {what}; {instead}"
        ))
    };
    if scheme.kv_cache.is_some() {
        return refuse(
            "KV-cache quantization (gs-host does not write msModelSlim's C8 tensors)",
            "remove the kv_cache table for this export",
        );
    }
    let Some(w) = scheme.weights else {
        if scheme.activations.is_some() {
            return refuse(
                "quantized activations on a layer whose weights stay in float",
                "quantize the layer's weights too, or leave its activations in float",
            );
        }
        return Ok(());
    };
    if w.ty == QuantType::Float {
        return refuse(
            "FP8 weights (gs-host writes only the int8 types W8A8, W8A8_DYNAMIC and W8A16)",
            "export FP8 as `compressed-tensors`",
        );
    }
    if w.bits != 8 {
        let bits = w.bits;
        return match (bits, scheme.activations) {
            (4, None) => refuse(
                "4-bit weights (W4A16): vLLM-Ascend has no W4A16 linear path (vllm-project/vllm-ascend#6481)",
                "export W4A16 as `compressed-tensors`, or use 8-bit weights (W8A16) for Ascend",
            ),
            (4, Some(_)) => refuse(
                "4-bit weights with quantized activations (W4A8): vLLM-Ascend loads W4A8_DYNAMIC for MoE experts only, not for linear layers",
                "export as `compressed-tensors`, or use 8-bit weights for Ascend",
            ),
            _ => refuse(
                &format!("{bits}-bit weights (it stores int8 weights only)"),
                &format!("set bits = 8 for Ascend, or export {bits}-bit weights as `compressed-tensors`"),
            ),
        };
    }
    if !w.symmetric {
        return if scheme.activations.is_some() {
            refuse(
                "asymmetric weights",
                "8-bit full quantization on Ascend needs symmetric weights: npu_quant_matmul has no weight offset; set symmetric = true",
            )
        } else {
            refuse(
                "asymmetric W8A16 weights",
                "npu_weight_quant_batchmatmul applies CANN's antiquant offset, and whether it adds or subtracts msModelSlim's weight_offset is unverified, so gs-host does not write one; set symmetric = true",
            )
        };
    }
    match w.granularity {
        Granularity::Tensor => {
            return refuse(
                "per-tensor weight scales (it stores one weight scale per output channel, or per group for W8A16)",
                "set granularity = \"channel\"",
            )
        }
        Granularity::Group(_) if scheme.activations.is_some() => {
            return refuse(
                "per-group weights with quantized activations: vLLM-Ascend's W8A8 and W8A8_DYNAMIC linears take one weight scale per output channel",
                "set granularity = \"channel\" for the weights",
            )
        }
        _ => {}
    }
    let Some(a) = scheme.activations else {
        return Ok(());
    };
    if a.args.ty == QuantType::Float {
        return refuse(
            "FP8 activations",
            "use int8 activations for Ascend, or export FP8 as `compressed-tensors`",
        );
    }
    if a.args.bits != 8 {
        return refuse(
            &format!(
                "{}-bit activations (it quantizes activations to int8)",
                a.args.bits
            ),
            "set bits = 8 in the activations table",
        );
    }
    if a.dynamic {
        match a.args.granularity {
            Granularity::Tensor => {
                return refuse(
                    "dynamic per-tensor activations: W8A8_DYNAMIC quantizes each token with its own scale (npu_dynamic_quant)",
                    "set granularity = \"token\" in the activations table",
                )
            }
            Granularity::Group(_) => {
                return refuse(
                    "per-group dynamic activations: W8A8_DYNAMIC quantizes each token with one scale (npu_dynamic_quant)",
                    "set granularity = \"token\" in the activations table",
                )
            }
            Granularity::Channel => {}
        }
        if !a.args.symmetric {
            return refuse(
                "asymmetric dynamic activations: npu_dynamic_quant is symmetric and W8A8_DYNAMIC stores no activation offset",
                "set symmetric = true in the activations table",
            );
        }
        if a.args.scale_rule != ScaleRule::Qmax {
            return refuse(
                "dynamic activation scales absmax/127.5 (scale_rule \"half_range\"): npu_dynamic_quant scales each token by absmax/127",
                "set scale_rule = \"qmax\" in the activations table",
            );
        }
    } else if a.args.granularity != Granularity::Tensor {
        return refuse(
            "static activations with more than one scale: W8A8 stores one input_scale and input_offset per layer",
            "set granularity = \"tensor\" in the activations table",
        );
    }
    Ok(())
}

/// `deq_scale[n] = input_scale · weight_scale[n]` in f32 (msModelSlim V1 `on_w8a8_static`).
pub(crate) fn deq_scales(input_scale: f32, weight_scales: &[f32]) -> Vec<f32> {
    weight_scales.iter().map(|&w| input_scale * w).collect()
}

/// The I64 form of a `deq_scale` (models that are not bf16): the f32 bit pattern viewed as
/// int32, sign-extended to int64 (msModelSlim `deqscale2int64`:
/// `np.frombuffer(f32 bytes, int32).astype(int64)`).
pub(crate) fn deq_scale_i64(d: f32) -> i64 {
    i64::from(d.to_bits() as i32)
}

/// `quant_bias[n] = round(bias[n]/deq[n] − input_offset·Σ_k q[n,k])`, in f32, rounded half to
/// even and cast to int32 (msModelSlim V1 `on_w8a8_static`: `torch.round(fp_weight_bias /
/// deq_scale − quant_weight.float().sum(1) · input_offset.float())`). It folds the bias and
/// the activation offset into the int32 accumulator of `npu_quant_matmul`:
/// `y = deq·(Σ_k q_w·q_x + quant_bias)` with `q_x = round(x/s + o)`.
pub(crate) fn quant_bias(
    bias: &[f32],
    deq: &[f32],
    input_offset: i32,
    q: &[i8],
    cols: usize,
) -> Result<Vec<i32>, String> {
    let offset = input_offset as f32;
    q.chunks_exact(cols)
        .zip(bias.iter().zip(deq))
        .enumerate()
        .map(|(n, (row, (&b, &d)))| {
            // Exact: |Σ| ≤ 128·cols < 2^24 for any real layer width.
            let rowsum = row.iter().map(|&v| i64::from(v)).sum::<i64>() as f32;
            let v = (b / d - rowsum * offset).round_ties_even();
            if v.is_finite() && v >= i32::MIN as f32 && v < i32::MAX as f32 {
                Ok(v as i32)
            } else {
                Err(format!(
                    "row {n}: quant_bias = round({b}/{d} − {offset}·{rowsum}) = {v} does not fit int32 (the bias is too large for the row's deq_scale)"
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gs_quant::ActArgs;

    fn int8_weights(symmetric: bool, granularity: Granularity) -> Scheme {
        Scheme {
            weights: Some(int8(symmetric, granularity)),
            ..Scheme::default()
        }
    }

    #[test]
    fn full_quantization_wants_symmetric_weights() {
        let mut s = int8_weights(false, Granularity::Channel);
        s.activations = Some(ActArgs {
            args: int8(true, Granularity::Tensor),
            dynamic: false,
        });
        let e = check_scheme("l", &s).unwrap_err();
        assert!(
            e.contains("8-bit full quantization on Ascend needs symmetric weights"),
            "{e}"
        );
        s.weights = Some(int8(true, Granularity::Channel));
        check_scheme("l", &s).unwrap();
    }

    #[test]
    fn group_sizes_must_divide_and_agree() {
        check_group(4, 172).unwrap();
        assert!(check_group(32, 172)
            .unwrap_err()
            .contains("does not divide the 172"));
        assert!(check_group(0, 172).is_err());
        same_group_size(None, "a", 64).unwrap();
        same_group_size(Some((64, "a")), "b", 64).unwrap();
        let e = same_group_size(Some((64, "a")), "b", 128).unwrap_err();
        assert!(
            e.starts_with("a uses groups of 64 and b groups of 128"),
            "{e}"
        );
        let layers = vec![
            ("a".to_string(), int8_weights(true, Granularity::Group(64))),
            ("c".to_string(), int8_weights(true, Granularity::Channel)),
            ("b".to_string(), int8_weights(true, Granularity::Group(128))),
        ];
        assert_eq!(
            check_plan(&layers).unwrap_err(),
            same_group_size(Some((64, "a")), "b", 128).unwrap_err()
        );
    }

    #[test]
    fn the_activation_offset_folds_into_quant_bias() {
        // y = deq·(Σ q_w·(q_x) + quant_bias) with q_x = round(x/s + o) must equal
        // deq·Σ q_w·(q_x − o) + bias: quant_bias = bias/deq − o·Σ q_w.
        let (q, deq, bias, offset) = ([3i8, -2, 5, 1], [0.5f32, 0.25], [1.0f32, -0.5], 7);
        let qb = quant_bias(&bias, &deq, offset, &q, 2).unwrap();
        assert_eq!(qb, [2 - 7, -2 - 7 * 6]);
        assert_eq!(deq_scales(0.5, &[2.0, 4.0]), [1.0, 2.0]);
        assert!(quant_bias(&[1e30], &[1e-10], 0, &[1, 1], 2).is_err());
    }
}
