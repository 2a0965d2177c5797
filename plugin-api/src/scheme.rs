//! Conversion between `gs_quant` schemes and their frozen ABI mirror.

use gs_quant::{ActArgs, Granularity, QuantArgs, QuantType, ScaleRule, Scheme};

use crate::abi::{AbiQuantArgs, AbiScheme, PluginError};

const ABSENT: AbiQuantArgs = AbiQuantArgs {
    bits: 0,
    ty: 0,
    symmetric: 0,
    granularity: 0,
    group_size: 0,
    scale_rule: 0,
    dynamic: 0,
    _reserved: [0; 2],
};

impl AbiQuantArgs {
    pub fn from_args(a: &QuantArgs, dynamic: bool) -> Self {
        let (granularity, group_size) = match a.granularity {
            Granularity::Tensor => (0, 0),
            Granularity::Channel => (1, 0),
            Granularity::Group(g) => (2, g),
        };
        Self {
            bits: a.bits,
            ty: match a.ty {
                QuantType::Int => 0,
                QuantType::Float => 1,
            },
            symmetric: a.symmetric as u8,
            granularity,
            group_size,
            scale_rule: match a.scale_rule {
                ScaleRule::HalfRange => 0,
                ScaleRule::Qmax => 1,
            },
            dynamic: dynamic as u8,
            _reserved: [0; 2],
        }
    }

    /// `None` when absent; an error for codes this SDK does not know (a newer host).
    pub fn to_args(&self) -> Result<Option<QuantArgs>, PluginError> {
        if self.bits == 0 {
            return Ok(None);
        }
        let ty = match self.ty {
            0 => QuantType::Int,
            1 => QuantType::Float,
            t => {
                return Err(PluginError::unsupported(format!(
                    "unknown quant type code {t}"
                )))
            }
        };
        let granularity = match self.granularity {
            0 => Granularity::Tensor,
            1 => Granularity::Channel,
            2 => Granularity::Group(self.group_size),
            g => {
                return Err(PluginError::unsupported(format!(
                    "unknown granularity code {g}"
                )))
            }
        };
        let scale_rule = match self.scale_rule {
            0 => ScaleRule::HalfRange,
            1 => ScaleRule::Qmax,
            r => {
                return Err(PluginError::unsupported(format!(
                    "unknown scale rule code {r}"
                )))
            }
        };
        Ok(Some(QuantArgs {
            bits: self.bits,
            ty,
            symmetric: self.symmetric != 0,
            granularity,
            scale_rule,
        }))
    }
}

impl AbiScheme {
    pub fn from_scheme(s: &Scheme) -> Self {
        Self {
            weights: s
                .weights
                .map_or(ABSENT, |w| AbiQuantArgs::from_args(&w, false)),
            activations: s
                .activations
                .map_or(ABSENT, |a| AbiQuantArgs::from_args(&a.args, a.dynamic)),
            kv_cache: s
                .kv_cache
                .map_or(ABSENT, |k| AbiQuantArgs::from_args(&k, false)),
        }
    }

    pub fn to_scheme(&self) -> Result<Scheme, PluginError> {
        Ok(Scheme {
            weights: self.weights.to_args()?,
            activations: self.activations.to_args()?.map(|args| ActArgs {
                args,
                dynamic: self.activations.dynamic != 0,
            }),
            kv_cache: self.kv_cache.to_args()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_round_trips_through_the_abi() {
        let s = Scheme {
            weights: Some(QuantArgs {
                bits: 4,
                ty: QuantType::Int,
                symmetric: false,
                granularity: Granularity::Group(64),
                scale_rule: ScaleRule::Qmax,
            }),
            activations: Some(ActArgs {
                args: QuantArgs {
                    bits: 8,
                    ty: QuantType::Int,
                    symmetric: true,
                    granularity: Granularity::Channel,
                    scale_rule: ScaleRule::HalfRange,
                },
                dynamic: true,
            }),
            kv_cache: None,
        };
        assert_eq!(AbiScheme::from_scheme(&s).to_scheme().unwrap(), s);
        let skip = Scheme::default();
        assert_eq!(AbiScheme::from_scheme(&skip).to_scheme().unwrap(), skip);
    }

    #[test]
    fn unknown_codes_are_errors_not_guesses() {
        let mut a = AbiScheme::from_scheme(&Scheme::default());
        a.weights.bits = 4;
        a.weights.granularity = 9;
        let e = a.to_scheme().unwrap_err();
        assert!(e.message.contains("granularity code 9"), "{e}");
    }
}
