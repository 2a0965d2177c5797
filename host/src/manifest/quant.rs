//! `[quant]`: presets, explicit field overrides, per-layer `[[quant.override]]` entries, and
//! their resolution to one [`gs_quant::Scheme`] per linear layer.

use gs_quant::{ActArgs, Granularity, QuantArgs, QuantType, ScaleRule, Scheme};
use regex::Regex;
use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use super::error::{table_label, Located, Location, ManifestError};
use super::raw::{
    RawActivations, RawGranularity, RawKvCache, RawOverride, RawQuant, RawScaleRule, RawType,
    RawWeights,
};
use super::source::{render_path, span_of, Seg, Source};

/// A named network-level scheme (`scheme = "w4a16"`). Every preset uses symmetric weights and
/// the `half_range` scale rule; see `docs/manifest.md` for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum Preset {
    /// int8 symmetric per-channel weights; activations in float.
    #[serde(rename = "w8a16")]
    W8A16,
    /// int4 symmetric weights in groups of 128 input columns; activations in float.
    #[serde(rename = "w4a16")]
    W4A16,
    /// int8 symmetric per-channel weights; int8 asymmetric per-tensor static activations
    /// (Ascend/MindIE W8A8: one calibrated `input_scale` and `input_offset` per layer).
    #[serde(rename = "w8a8")]
    W8A8,
    /// int8 symmetric per-channel weights; int8 symmetric per-token dynamic activations.
    #[serde(rename = "w8a8_dynamic")]
    W8A8Dynamic,
    /// int4 symmetric group-128 weights; int8 symmetric per-token dynamic activations.
    #[serde(rename = "w4a8")]
    W4A8,
    /// FP8 E4M3 per-tensor weights; FP8 per-tensor static activations.
    #[serde(rename = "fp8")]
    Fp8,
    /// FP8 E4M3 per-channel weights; FP8 per-token dynamic activations.
    #[serde(rename = "fp8_dynamic")]
    Fp8Dynamic,
}

impl Preset {
    pub const ALL: [Preset; 7] = [
        Preset::W8A16,
        Preset::W4A16,
        Preset::W8A8,
        Preset::W8A8Dynamic,
        Preset::W4A8,
        Preset::Fp8,
        Preset::Fp8Dynamic,
    ];

    /// The name written in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Preset::W8A16 => "w8a16",
            Preset::W4A16 => "w4a16",
            Preset::W8A8 => "w8a8",
            Preset::W8A8Dynamic => "w8a8_dynamic",
            Preset::W4A8 => "w4a8",
            Preset::Fp8 => "fp8",
            Preset::Fp8Dynamic => "fp8_dynamic",
        }
    }

    /// The scheme this preset stands for. No preset quantizes the KV cache.
    pub fn scheme(self) -> Scheme {
        let args = |bits, ty, symmetric, granularity| QuantArgs {
            bits,
            ty,
            symmetric,
            granularity,
            scale_rule: ScaleRule::HalfRange,
        };
        let int8_channel = args(8, QuantType::Int, true, Granularity::Channel);
        let int4_group = args(4, QuantType::Int, true, Granularity::Group(128));
        let int8_token = ActArgs {
            args: args(8, QuantType::Int, true, Granularity::Channel),
            dynamic: true,
        };
        let (weights, activations) = match self {
            Preset::W8A16 => (int8_channel, None),
            Preset::W4A16 => (int4_group, None),
            Preset::W8A8 => (
                int8_channel,
                Some(ActArgs {
                    args: args(8, QuantType::Int, false, Granularity::Tensor),
                    dynamic: false,
                }),
            ),
            Preset::W8A8Dynamic => (int8_channel, Some(int8_token)),
            Preset::W4A8 => (int4_group, Some(int8_token)),
            Preset::Fp8 => (
                args(8, QuantType::Float, true, Granularity::Tensor),
                Some(ActArgs {
                    args: args(8, QuantType::Float, true, Granularity::Tensor),
                    dynamic: false,
                }),
            ),
            Preset::Fp8Dynamic => (
                args(8, QuantType::Float, true, Granularity::Channel),
                Some(ActArgs {
                    args: args(8, QuantType::Float, true, Granularity::Channel),
                    dynamic: true,
                }),
            ),
        };
        Scheme {
            weights: Some(weights),
            activations,
            kv_cache: None,
        }
    }
}

/// The `granularity` key as written; `Token` is the activation spelling of
/// [`Granularity::Channel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GranularityName {
    Tensor,
    Channel,
    Group,
    Token,
}

impl GranularityName {
    fn name(self) -> &'static str {
        match self {
            GranularityName::Tensor => "tensor",
            GranularityName::Channel => "channel",
            GranularityName::Group => "group",
            GranularityName::Token => "token",
        }
    }
}

/// One `weights`, `activations` or `kv_cache` table as written. Absent keys are `None` and
/// are taken from the scheme underneath (preset or network scheme).
#[derive(Debug, Clone, PartialEq)]
pub struct ArgsSpec {
    /// Key path of the table, e.g. `quant.weights` or `quant.override[1].activations`.
    pub table: String,
    pub at: Location,
    pub enabled: Option<Located<bool>>,
    pub bits: Option<Located<i64>>,
    pub ty: Option<Located<QuantType>>,
    pub symmetric: Option<Located<bool>>,
    pub dynamic: Option<Located<bool>>,
    pub granularity: Option<Located<GranularityName>>,
    pub group_size: Option<Located<i64>>,
    pub scale_rule: Option<Located<ScaleRule>>,
}

/// A preset (the `scheme` key) plus explicit tables applied on top of it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SchemeSpec {
    pub preset: Option<Located<Preset>>,
    pub weights: Option<ArgsSpec>,
    pub activations: Option<ArgsSpec>,
    pub kv_cache: Option<ArgsSpec>,
}

impl SchemeSpec {
    /// The first scheme key present, for messages: `scheme`, `weights`, ...
    fn first_key(&self) -> Option<&'static str> {
        if self.preset.is_some() {
            Some("scheme")
        } else if self.weights.is_some() {
            Some("weights")
        } else if self.activations.is_some() {
            Some("activations")
        } else if self.kv_cache.is_some() {
            Some("kv_cache")
        } else {
            None
        }
    }
}

/// One `[[quant.override]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct OverrideSpec {
    pub at: Location,
    /// Regex searched (unanchored) in the full module name.
    pub pattern: Located<String>,
    pub skip: Option<Located<bool>>,
    pub scheme: SchemeSpec,
}

/// The `[quant]` section as written (validated by [`QuantPlan::new`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantSection {
    pub at: Location,
    pub scheme: SchemeSpec,
    pub overrides: Vec<OverrideSpec>,
}

#[derive(Debug, Clone)]
struct CompiledOverride {
    index: usize,
    pattern: String,
    regex: Regex,
    scheme: Scheme,
}

/// The resolved `[quant]` section: the network scheme and compiled overrides.
#[derive(Debug, Clone)]
pub struct QuantPlan {
    network: Scheme,
    overrides: Vec<CompiledOverride>,
}

impl QuantPlan {
    /// Resolves presets and tables, validates every field and compiles the override regexes.
    pub fn new(section: &QuantSection) -> Result<QuantPlan, ManifestError> {
        if section.scheme.preset.is_none() && section.scheme.weights.is_none() {
            return Err(ManifestError::Incomplete {
                at: section.at.clone(),
                table: "quant".into(),
                message: "[quant] needs `scheme` or a [quant.weights] table".into(),
            });
        }
        let network = resolve(Scheme::default(), &section.scheme)?;
        let mut overrides = Vec::with_capacity(section.overrides.len());
        for (index, o) in section.overrides.iter().enumerate() {
            let key = format!("quant.override[{index}]");
            let regex = Regex::new(&o.pattern.value).map_err(|source| ManifestError::BadRegex {
                at: o.pattern.at.clone(),
                key: format!("{key}.pattern"),
                pattern: o.pattern.value.clone(),
                source,
            })?;
            let scheme = match (&o.skip, o.scheme.first_key()) {
                (Some(skip), Some(other)) if skip.value => {
                    return Err(ManifestError::Conflict {
                        at: skip.at.clone(),
                        key: format!("{key}.skip"),
                        other: format!("{key}.{other}"),
                        reason: "a skipped layer stays in float, so it has no scheme".into(),
                    })
                }
                (Some(skip), None) if skip.value => Scheme::default(),
                (_, None) => {
                    return Err(ManifestError::Incomplete {
                        at: o.at.clone(),
                        table: key.clone(),
                        message: format!(
                            "`{key}` needs `skip = true`, `scheme`, or a weights/activations/\
                             kv_cache table"
                        ),
                    })
                }
                (_, Some(_)) => resolve(network, &o.scheme)?,
            };
            overrides.push(CompiledOverride {
                index,
                pattern: o.pattern.value.clone(),
                regex,
                scheme,
            });
        }
        Ok(QuantPlan { network, overrides })
    }

    /// The scheme of layers no override matches.
    pub fn network_scheme(&self) -> Scheme {
        self.network
    }

    /// The scheme of one linear layer, by full module name (`model.layers.3.mlp.down_proj`).
    ///
    /// The last override whose pattern matches wins; a skipped layer has every field `None`.
    pub fn scheme_for(&self, module_name: &str) -> Scheme {
        self.overrides
            .iter()
            .rev()
            .find(|o| o.regex.is_match(module_name))
            .map_or(self.network, |o| o.scheme)
    }

    /// Overrides that match none of `module_names`, as `(index, pattern)`.
    ///
    /// Usually a typo or a pattern for another architecture; the caller should warn, not
    /// fail, so that one manifest can serve several models.
    pub fn unused_overrides<'a>(
        &self,
        module_names: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(usize, String)> {
        let mut used = vec![false; self.overrides.len()];
        for name in module_names {
            for (u, o) in used.iter_mut().zip(&self.overrides) {
                *u = *u || o.regex.is_match(name);
            }
        }
        self.overrides
            .iter()
            .zip(used)
            .filter(|(_, u)| !u)
            .map(|(o, _)| (o.index, o.pattern.clone()))
            .collect()
    }
}

/// Applies `spec` on top of its preset, or on top of `base` when it names none.
fn resolve(base: Scheme, spec: &SchemeSpec) -> Result<Scheme, ManifestError> {
    let base = spec.preset.as_ref().map_or(base, |p| p.value.scheme());
    Ok(Scheme {
        weights: match &spec.weights {
            Some(t) => Some(resolve_weights(base.weights, t)?),
            None => base.weights,
        },
        activations: match &spec.activations {
            Some(t) => resolve_activations(base.activations, t)?,
            None => base.activations,
        },
        kv_cache: match &spec.kv_cache {
            Some(t) => resolve_kv_cache(base.kv_cache, t)?,
            None => base.kv_cache,
        },
    })
}

/// A key the user wrote, for blaming it in an error.
struct Field {
    key: String,
    at: Location,
    value: String,
}

impl ArgsSpec {
    fn field<T>(
        &self,
        name: &str,
        v: &Option<Located<T>>,
        show: impl Fn(&T) -> String,
    ) -> Option<Field> {
        v.as_ref().map(|l| Field {
            key: format!("{}.{name}", self.table),
            at: l.at.clone(),
            value: show(&l.value),
        })
    }
    fn f_enabled(&self) -> Option<Field> {
        self.field("enabled", &self.enabled, bool::to_string)
    }
    fn f_bits(&self) -> Option<Field> {
        self.field("bits", &self.bits, i64::to_string)
    }
    fn f_type(&self) -> Option<Field> {
        self.field("type", &self.ty, |t| format!("{:?}", type_name(*t)))
    }
    fn f_symmetric(&self) -> Option<Field> {
        self.field("symmetric", &self.symmetric, bool::to_string)
    }
    fn f_dynamic(&self) -> Option<Field> {
        self.field("dynamic", &self.dynamic, bool::to_string)
    }
    fn f_granularity(&self) -> Option<Field> {
        self.field("granularity", &self.granularity, |g| {
            format!("{:?}", g.name())
        })
    }
    fn f_group_size(&self) -> Option<Field> {
        self.field("group_size", &self.group_size, i64::to_string)
    }
    fn f_scale_rule(&self) -> Option<Field> {
        self.field("scale_rule", &self.scale_rule, |r| {
            format!("{:?}", scale_rule_name(*r))
        })
    }

    /// An [`ManifestError::Invalid`] blaming the first of `fields` the user wrote (the others
    /// came from the preset underneath, which is valid by construction).
    fn invalid(&self, fields: [Option<Field>; 2], reason: impl Into<String>) -> ManifestError {
        let reason = reason.into();
        match fields.into_iter().flatten().next() {
            Some(f) => ManifestError::Invalid {
                at: f.at,
                key: f.key,
                value: f.value,
                reason,
            },
            None => ManifestError::Incomplete {
                at: self.at.clone(),
                message: format!("{} is invalid: {reason}", table_label(&self.table)),
                table: self.table.clone(),
            },
        }
    }

    fn needs_bits(&self) -> ManifestError {
        ManifestError::Incomplete {
            at: self.at.clone(),
            table: self.table.clone(),
            message: format!(
                "`bits` is required {} (no `scheme` preset or network scheme gives it)",
                table_label(&self.table)
            ),
        }
    }

    /// With `enabled = false` nothing else may be set: it would be silently ignored.
    fn check_disabled_alone(&self) -> Result<(), ManifestError> {
        let others = [
            self.f_bits(),
            self.f_type(),
            self.f_symmetric(),
            self.f_dynamic(),
            self.f_granularity(),
            self.f_group_size(),
            self.f_scale_rule(),
        ];
        match (self.f_enabled(), others.into_iter().flatten().next()) {
            (Some(enabled), Some(other)) => Err(ManifestError::Conflict {
                at: other.at,
                key: other.key,
                other: enabled.key,
                reason: "`enabled = false` turns this quantization off".into(),
            }),
            _ => Ok(()),
        }
    }
}

fn type_name(t: QuantType) -> &'static str {
    match t {
        QuantType::Int => "int",
        QuantType::Float => "float",
    }
}

fn scale_rule_name(r: ScaleRule) -> &'static str {
    match r {
        ScaleRule::HalfRange => "half_range",
        ScaleRule::Qmax => "qmax",
    }
}

/// Bits valid for the type: 1..=8 for int, exactly 8 for float (FP8 E4M3).
fn check_bits(t: &ArgsSpec, bits: i64, ty: QuantType) -> Result<u8, ManifestError> {
    match ty {
        QuantType::Int if (1..=8).contains(&bits) => Ok(bits as u8),
        QuantType::Int => Err(t.invalid([t.f_bits(), t.f_type()], "int bits must be in 1..=8")),
        QuantType::Float if bits == 8 => Ok(8),
        QuantType::Float => Err(t.invalid(
            [t.f_bits(), t.f_type()],
            "type = \"float\" is FP8 E4M3 and needs bits = 8",
        )),
    }
}

/// Fields shared by all three tables, each taken from the table, else `base`, else default.
struct Common {
    bits: u8,
    ty: QuantType,
    symmetric: bool,
    scale_rule: ScaleRule,
}

fn common(t: &ArgsSpec, base: Option<&QuantArgs>) -> Result<Common, ManifestError> {
    let bits = match (&t.bits, base) {
        (Some(b), _) => b.value,
        (None, Some(b)) => i64::from(b.bits),
        (None, None) => return Err(t.needs_bits()),
    };
    let ty =
        t.ty.as_ref()
            .map(|l| l.value)
            .or(base.map(|b| b.ty))
            .unwrap_or(QuantType::Int);
    let symmetric = t
        .symmetric
        .as_ref()
        .map(|l| l.value)
        .or(base.map(|b| b.symmetric))
        .unwrap_or(true);
    let scale_rule = t
        .scale_rule
        .as_ref()
        .map(|l| l.value)
        .or(base.map(|b| b.scale_rule))
        .unwrap_or(ScaleRule::HalfRange);
    let bits = check_bits(t, bits, ty)?;
    if ty == QuantType::Float && !symmetric {
        return Err(t.invalid(
            [t.f_symmetric(), t.f_type()],
            "FP8 quantization is symmetric only (no zero point)",
        ));
    }
    if ty == QuantType::Int && symmetric && bits == 1 && scale_rule == ScaleRule::Qmax {
        return Err(t.invalid(
            [t.f_scale_rule(), t.f_bits()],
            "symmetric 1-bit int has qmax = 0, so the \"qmax\" rule would divide by zero; \
             use \"half_range\"",
        ));
    }
    Ok(Common {
        bits,
        ty,
        symmetric,
        scale_rule,
    })
}

impl Common {
    /// The finished args, re-checked by gs-quant so that the manifest never accepts what the
    /// primitives would refuse (the checks above give the located messages; this is the
    /// backstop should gs-quant add a rule).
    fn args(self, t: &ArgsSpec, granularity: Granularity) -> Result<QuantArgs, ManifestError> {
        let args = QuantArgs {
            bits: self.bits,
            ty: self.ty,
            symmetric: self.symmetric,
            granularity,
            scale_rule: self.scale_rule,
        };
        args.validate().map_err(|e| ManifestError::Incomplete {
            at: t.at.clone(),
            table: t.table.clone(),
            message: format!("{} is invalid: {e}", table_label(&t.table)),
        })?;
        Ok(args)
    }
}

fn group_size(t: &ArgsSpec, gs: &Located<i64>) -> Result<u32, ManifestError> {
    u32::try_from(gs.value)
        .ok()
        .filter(|g| *g > 0)
        .ok_or_else(|| {
            t.invalid(
                [t.f_group_size(), None],
                "group_size must be a positive integer",
            )
        })
}

fn resolve_weights(base: Option<QuantArgs>, t: &ArgsSpec) -> Result<QuantArgs, ManifestError> {
    let c = common(t, base.as_ref())?;
    let granularity = match (t.granularity.as_ref().map(|l| l.value), &t.group_size) {
        (Some(GranularityName::Token), _) => {
            return Err(t.invalid(
                [t.f_granularity(), None],
                "\"token\" is for activations; weights use \"tensor\", \"channel\" or \"group\"",
            ))
        }
        (Some(GranularityName::Tensor | GranularityName::Channel), Some(_)) => {
            return Err(conflict(
                t,
                t.f_group_size(),
                t.f_granularity(),
                "group_size only applies to granularity = \"group\"",
            ))
        }
        (Some(GranularityName::Tensor), None) => Granularity::Tensor,
        (Some(GranularityName::Channel), None) => Granularity::Channel,
        // `group_size` alone implies group granularity.
        (Some(GranularityName::Group) | None, Some(gs)) => Granularity::Group(group_size(t, gs)?),
        (Some(GranularityName::Group), None) => match base.map(|b| b.granularity) {
            Some(g @ Granularity::Group(_)) => g,
            _ => {
                return Err(t.invalid(
                    [t.f_granularity(), None],
                    "granularity = \"group\" needs `group_size`",
                ))
            }
        },
        (None, None) => base.map_or(Granularity::Channel, |b| b.granularity),
    };
    c.args(t, granularity)
}

/// `a` cannot be given together with `b`; both are keys the user wrote.
fn conflict(t: &ArgsSpec, a: Option<Field>, b: Option<Field>, reason: &str) -> ManifestError {
    match (a, b) {
        (Some(a), Some(b)) => ManifestError::Conflict {
            at: a.at,
            key: a.key,
            other: b.key,
            reason: reason.into(),
        },
        (a, b) => t.invalid([a, b], reason),
    }
}

fn resolve_activations(
    base: Option<ActArgs>,
    t: &ArgsSpec,
) -> Result<Option<ActArgs>, ManifestError> {
    t.check_disabled_alone()?;
    if t.enabled.as_ref().is_some_and(|e| !e.value) {
        return Ok(None);
    }
    let c = common(t, base.as_ref().map(|b| &b.args))?;
    if t.group_size.is_some() {
        return Err(t.invalid(
            [t.f_group_size(), None],
            "activations are quantized per tensor or per token; group_size does not apply",
        ));
    }
    let dynamic = t
        .dynamic
        .as_ref()
        .map(|l| l.value)
        .or(base.map(|b| b.dynamic))
        .unwrap_or(false);
    let granularity = match t.granularity.as_ref().map(|l| l.value) {
        Some(GranularityName::Tensor) => Granularity::Tensor,
        Some(GranularityName::Token) => Granularity::Channel,
        Some(GranularityName::Channel | GranularityName::Group) => {
            return Err(t.invalid(
                [t.f_granularity(), None],
                "activations use granularity \"tensor\" or \"token\"",
            ))
        }
        None => match base {
            Some(b) => b.args.granularity,
            None if dynamic => Granularity::Channel,
            None => Granularity::Tensor,
        },
    };
    if granularity == Granularity::Channel && !dynamic {
        return Err(t.invalid(
            [t.f_dynamic(), t.f_granularity()],
            "static activation scales are calibrated per tensor; per-token scales need \
             dynamic = true (or set granularity = \"tensor\")",
        ));
    }
    Ok(Some(ActArgs {
        args: c.args(t, granularity)?,
        dynamic,
    }))
}

fn resolve_kv_cache(
    base: Option<QuantArgs>,
    t: &ArgsSpec,
) -> Result<Option<QuantArgs>, ManifestError> {
    t.check_disabled_alone()?;
    if t.enabled.as_ref().is_some_and(|e| !e.value) {
        return Ok(None);
    }
    let c = common(t, base.as_ref())?;
    c.args(t, Granularity::Tensor).map(Some)
}

// ---- raw → spec ----------------------------------------------------------------------------

/// Converts the deserialized `[quant]` table, attaching locations.
pub(crate) fn section_from_raw(
    raw: RawQuant,
    src: &Source<'_>,
    root: &Spanned<DeTable<'_>>,
) -> QuantSection {
    let quant = vec![Seg::Key("quant".into())];
    let scheme = SchemeSpec {
        preset: raw.scheme.map(|p| located(src, p)),
        weights: raw.weights.map(|w| weights_spec(w, src, root, &quant)),
        activations: raw
            .activations
            .map(|a| activations_spec(a, src, root, &quant)),
        kv_cache: raw.kv_cache.map(|k| kv_spec(k, src, root, &quant)),
    };
    let overrides = raw
        .overrides
        .into_iter()
        .enumerate()
        .map(|(i, o)| override_spec(o, i, src, root))
        .collect();
    QuantSection {
        at: src.locate(&span_of(root, &quant)),
        scheme,
        overrides,
    }
}

fn override_spec(
    o: RawOverride,
    index: usize,
    src: &Source<'_>,
    root: &Spanned<DeTable<'_>>,
) -> OverrideSpec {
    let path = vec![
        Seg::Key("quant".into()),
        Seg::Key("override".into()),
        Seg::Index(index),
    ];
    OverrideSpec {
        at: src.locate(&span_of(root, &path)),
        pattern: located(src, o.pattern),
        skip: o.skip.map(|s| located(src, s)),
        scheme: SchemeSpec {
            preset: o.scheme.map(|p| located(src, p)),
            weights: o.weights.map(|w| weights_spec(w, src, root, &path)),
            activations: o.activations.map(|a| activations_spec(a, src, root, &path)),
            kv_cache: o.kv_cache.map(|k| kv_spec(k, src, root, &path)),
        },
    }
}

fn located<T>(src: &Source<'_>, s: Spanned<T>) -> Located<T> {
    let at = src.at(&s);
    Located {
        value: s.into_inner(),
        at,
    }
}

fn map_located<T, U>(
    src: &Source<'_>,
    s: Option<Spanned<T>>,
    f: impl Fn(T) -> U,
) -> Option<Located<U>> {
    s.map(|s| {
        let at = src.at(&s);
        Located {
            value: f(s.into_inner()),
            at,
        }
    })
}

fn quant_type(t: RawType) -> QuantType {
    match t {
        RawType::Int => QuantType::Int,
        RawType::Float => QuantType::Float,
    }
}

fn granularity_name(g: RawGranularity) -> GranularityName {
    match g {
        RawGranularity::Tensor => GranularityName::Tensor,
        RawGranularity::Channel => GranularityName::Channel,
        RawGranularity::Group => GranularityName::Group,
        RawGranularity::Token => GranularityName::Token,
    }
}

fn scale_rule(r: RawScaleRule) -> ScaleRule {
    match r {
        RawScaleRule::HalfRange => ScaleRule::HalfRange,
        RawScaleRule::Qmax => ScaleRule::Qmax,
    }
}

fn empty_spec(
    src: &Source<'_>,
    root: &Spanned<DeTable<'_>>,
    parent: &[Seg],
    name: &str,
) -> ArgsSpec {
    let mut path = parent.to_vec();
    path.push(Seg::Key(name.into()));
    ArgsSpec {
        table: render_path(&path),
        at: src.locate(&span_of(root, &path)),
        enabled: None,
        bits: None,
        ty: None,
        symmetric: None,
        dynamic: None,
        granularity: None,
        group_size: None,
        scale_rule: None,
    }
}

fn weights_spec(
    w: RawWeights,
    src: &Source<'_>,
    root: &Spanned<DeTable<'_>>,
    parent: &[Seg],
) -> ArgsSpec {
    ArgsSpec {
        bits: w.bits.map(|s| located(src, s)),
        ty: map_located(src, w.ty, quant_type),
        symmetric: w.symmetric.map(|s| located(src, s)),
        granularity: map_located(src, w.granularity, granularity_name),
        group_size: w.group_size.map(|s| located(src, s)),
        scale_rule: map_located(src, w.scale_rule, scale_rule),
        ..empty_spec(src, root, parent, "weights")
    }
}

fn activations_spec(
    a: RawActivations,
    src: &Source<'_>,
    root: &Spanned<DeTable<'_>>,
    parent: &[Seg],
) -> ArgsSpec {
    ArgsSpec {
        enabled: a.enabled.map(|s| located(src, s)),
        bits: a.bits.map(|s| located(src, s)),
        ty: map_located(src, a.ty, quant_type),
        symmetric: a.symmetric.map(|s| located(src, s)),
        dynamic: a.dynamic.map(|s| located(src, s)),
        granularity: map_located(src, a.granularity, granularity_name),
        group_size: a.group_size.map(|s| located(src, s)),
        scale_rule: map_located(src, a.scale_rule, scale_rule),
        ..empty_spec(src, root, parent, "activations")
    }
}

fn kv_spec(
    k: RawKvCache,
    src: &Source<'_>,
    root: &Spanned<DeTable<'_>>,
    parent: &[Seg],
) -> ArgsSpec {
    ArgsSpec {
        enabled: k.enabled.map(|s| located(src, s)),
        bits: k.bits.map(|s| located(src, s)),
        ty: map_located(src, k.ty, quant_type),
        symmetric: k.symmetric.map(|s| located(src, s)),
        ..empty_spec(src, root, parent, "kv_cache")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(bits: u8, ty: QuantType, symmetric: bool, granularity: Granularity) -> QuantArgs {
        QuantArgs {
            bits,
            ty,
            symmetric,
            granularity,
            scale_rule: ScaleRule::HalfRange,
        }
    }

    #[test]
    fn presets_mean_exactly_what_the_docs_say() {
        use Granularity::{Channel, Group, Tensor};
        use QuantType::{Float, Int};
        let act = |args, dynamic| Some(ActArgs { args, dynamic });
        let table = [
            (Preset::W8A16, a(8, Int, true, Channel), None),
            (Preset::W4A16, a(4, Int, true, Group(128)), None),
            (
                Preset::W8A8,
                a(8, Int, true, Channel),
                act(a(8, Int, false, Tensor), false),
            ),
            (
                Preset::W8A8Dynamic,
                a(8, Int, true, Channel),
                act(a(8, Int, true, Channel), true),
            ),
            (
                Preset::W4A8,
                a(4, Int, true, Group(128)),
                act(a(8, Int, true, Channel), true),
            ),
            (
                Preset::Fp8,
                a(8, Float, true, Tensor),
                act(a(8, Float, true, Tensor), false),
            ),
            (
                Preset::Fp8Dynamic,
                a(8, Float, true, Channel),
                act(a(8, Float, true, Channel), true),
            ),
        ];
        for (preset, weights, activations) in table {
            let s = preset.scheme();
            assert_eq!(s.weights, Some(weights), "{}", preset.name());
            assert_eq!(s.activations, activations, "{}", preset.name());
            assert_eq!(s.kv_cache, None, "{}", preset.name());
        }
        assert_eq!(table.len(), Preset::ALL.len());
    }

    #[test]
    fn preset_names_match_their_serde_names() {
        for p in Preset::ALL {
            let parsed: Result<toml::Table, _> = toml::from_str(&format!("s = {:?}", p.name()));
            let value = parsed.ok().and_then(|t| t.get("s").cloned());
            let back = value.and_then(|v| Preset::deserialize(v).ok());
            assert_eq!(back, Some(p));
        }
    }
}
