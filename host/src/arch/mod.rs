//! Model families as data: one small TOML file per family names the decoder block's modules
//! by *role* (what the forward computes with them), the top-level tensors, which linears carry
//! a bias, and the block's *subsets* (the unit every algorithm transforms) with the *tap* where
//! each subset's input is observed. Adding a family is adding a file here and one line to
//! [`FAMILIES`]; [`families`] checks every file for consistency.

use serde::Deserialize;

/// The bundled family files.
const FAMILIES: &[(&str, &str)] = &[
    ("llama.toml", include_str!("llama.toml")),
    ("mistral.toml", include_str!("mistral.toml")),
    ("qwen2.toml", include_str!("qwen2.toml")),
    ("qwen3.toml", include_str!("qwen3.toml")),
];

/// Errors describing a model this host cannot handle.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("unsupported architecture {found:?} in {config}; supported: {supported}")]
    Unsupported {
        found: Vec<String>,
        config: String,
        supported: String,
    },
    #[error("family file {file} is invalid: {message}")]
    BadFamilyFile { file: String, message: String },
}

/// How a subset's prev_op relates to its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrevOpKind {
    /// RMSNorm weight `[hidden]`.
    Norm,
    /// A linear layer whose output rows feed the subset.
    Linear,
    /// Nothing foldable.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrevOpSpec {
    pub kind: PrevOpKind,
    /// Module path relative to the block.
    pub module: String,
}

/// Where a subset's input is observed in the decoder block, in data-flow order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tap {
    /// `input_layernorm(h)`: the input of q/k/v.
    AttnInput,
    /// The attention output before `o_proj` (heads concatenated): the input of o.
    AttnContext,
    /// `post_attention_layernorm(h)`: the input of gate/up.
    MlpInput,
    /// `silu(gate(x)) · up(x)`: the input of down.
    MlpHidden,
}

impl Tap {
    /// Every tap, in the order the block computes them.
    pub const ALL: [Tap; 4] = [
        Tap::AttnInput,
        Tap::AttnContext,
        Tap::MlpInput,
        Tap::MlpHidden,
    ];

    /// Position in the block's data flow (0 = first); a change to a module feeding tap `r`
    /// makes every statistic observed at a tap `>= r` stale.
    pub fn rank(self) -> usize {
        self as usize
    }

    /// The name used in family files, e.g. `"attn_input"`.
    pub fn name(self) -> &'static str {
        match self {
            Tap::AttnInput => "attn_input",
            Tap::AttnContext => "attn_context",
            Tap::MlpInput => "mlp_input",
            Tap::MlpHidden => "mlp_hidden",
        }
    }
}

/// The linear layers of a decoder block, by what the forward computes with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearRole {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearRole {
    /// Every role, in data-flow order.
    pub const ALL: [LinearRole; 7] = [
        LinearRole::Q,
        LinearRole::K,
        LinearRole::V,
        LinearRole::O,
        LinearRole::Gate,
        LinearRole::Up,
        LinearRole::Down,
    ];

    /// The tap that observes this layer's input.
    pub fn input_tap(self) -> Tap {
        match self {
            LinearRole::Q | LinearRole::K | LinearRole::V => Tap::AttnInput,
            LinearRole::O => Tap::AttnContext,
            LinearRole::Gate | LinearRole::Up => Tap::MlpInput,
            LinearRole::Down => Tap::MlpHidden,
        }
    }

    /// The name used in family files, e.g. `"gate"`.
    pub fn name(self) -> &'static str {
        match self {
            LinearRole::Q => "q",
            LinearRole::K => "k",
            LinearRole::V => "v",
            LinearRole::O => "o",
            LinearRole::Gate => "gate",
            LinearRole::Up => "up",
            LinearRole::Down => "down",
        }
    }
}

/// The block modules by role, paths relative to the block. Each tensor is `<module>.weight`
/// (and `<module>.bias` for the linears listed in [`BiasSpec`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockModules {
    /// RMSNorm before attention, weight `[hidden]`.
    pub input_norm: String,
    pub q: String,
    pub k: String,
    pub v: String,
    pub o: String,
    /// Per-head RMSNorm of the queries before RoPE, weight `[head_dim]` (Qwen3).
    #[serde(default)]
    pub q_norm: Option<String>,
    /// Per-head RMSNorm of the keys before RoPE, weight `[head_dim]` (Qwen3).
    #[serde(default)]
    pub k_norm: Option<String>,
    /// RMSNorm before the MLP, weight `[hidden]`.
    pub post_attention_norm: String,
    pub gate: String,
    pub up: String,
    pub down: String,
}

impl BlockModules {
    /// The linear role of a module path (relative to the block), if it is a block linear.
    pub fn role_of(&self, module: &str) -> Option<LinearRole> {
        LinearRole::ALL
            .into_iter()
            .find(|r| self.linear(*r) == module)
    }

    /// The module of a linear role.
    pub fn linear(&self, role: LinearRole) -> &str {
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
}

/// Which linears have a bias: `always`, plus those switched on by config.json's
/// `attention_bias` / `mlp_bias` flags (transformers ignores bias tensors of any other linear).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiasSpec {
    #[serde(default)]
    pub always: Vec<LinearRole>,
    #[serde(default)]
    pub attention_bias: Vec<LinearRole>,
    #[serde(default)]
    pub mlp_bias: Vec<LinearRole>,
}

/// The model's top-level modules; each tensor is `<module>.weight`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopModules {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: String,
    /// Final RMSNorm `[hidden]`.
    pub norm: String,
    /// Output projection `[vocab, hidden]`; replaced by `embed_tokens` when tied.
    pub lm_head: String,
}

/// One subset of a block, with module paths relative to the block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsetSpec {
    pub name: String,
    pub layers: Vec<String>,
    pub prev_op: PrevOpSpec,
    /// The module whose output AWQ-style searches compare (module-forward service).
    pub inspect: String,
    /// Where the subset's input is observed in the block.
    pub tap: Tap,
}

/// A model family: which `architectures` it covers, its modules by role, and the subsets of
/// its blocks in the order the scheduler runs them (the order data flows through the block).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub family: String,
    pub architectures: Vec<String>,
    /// Block module prefix with `{i}` for the block index.
    pub block: String,
    pub bias: BiasSpec,
    pub top: TopModules,
    pub modules: BlockModules,
    #[serde(rename = "subset")]
    pub subsets: Vec<SubsetSpec>,
}

/// A subset of one concrete block, with full module names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSubset {
    pub name: String,
    pub layers: Vec<String>,
    pub prev_op: Option<(PrevOpKind, String)>,
    pub inspect: String,
    /// Where the subset's input is observed in the block.
    pub tap: Tap,
}

impl Family {
    /// Module prefix of block `i`, e.g. `model.layers.3`.
    pub fn block_prefix(&self, i: usize) -> String {
        self.block.replace("{i}", &i.to_string())
    }

    /// The subsets of block `i` with full module names.
    pub fn block_subsets(&self, i: usize) -> Vec<BlockSubset> {
        let p = self.block_prefix(i);
        self.subsets
            .iter()
            .map(|s| BlockSubset {
                name: s.name.clone(),
                layers: s.layers.iter().map(|l| format!("{p}.{l}")).collect(),
                prev_op: match s.prev_op.kind {
                    PrevOpKind::None => None,
                    k => Some((k, format!("{p}.{}", s.prev_op.module))),
                },
                inspect: format!("{p}.{}", s.inspect),
                tap: s.tap,
            })
            .collect()
    }

    /// Full name of a block module's tensor, e.g. `model.layers.3.self_attn.q_proj.weight`
    /// for `(3, "self_attn.q_proj", "weight")`.
    pub fn block_tensor(&self, i: usize, module: &str, param: &str) -> String {
        format!("{}.{module}.{param}", self.block_prefix(i))
    }

    /// The linears that have a bias, given config.json's `attention_bias` and `mlp_bias`
    /// (in data-flow order, without duplicates).
    pub fn bias_roles(&self, attention_bias: bool, mlp_bias: bool) -> Vec<LinearRole> {
        LinearRole::ALL
            .into_iter()
            .filter(|r| {
                self.bias.always.contains(r)
                    || (attention_bias && self.bias.attention_bias.contains(r))
                    || (mlp_bias && self.bias.mlp_bias.contains(r))
            })
            .collect()
    }

    /// Tensor of the token embedding, e.g. `model.embed_tokens.weight`.
    pub fn embed_tokens_weight(&self) -> String {
        format!("{}.weight", self.top.embed_tokens)
    }

    /// Tensor of the final norm, e.g. `model.norm.weight`.
    pub fn final_norm_weight(&self) -> String {
        format!("{}.weight", self.top.norm)
    }

    /// Tensor of the output projection: the embedding when `tied` (config.json's
    /// `tie_word_embeddings`), else e.g. `lm_head.weight`.
    pub fn lm_head_weight(&self, tied: bool) -> String {
        if tied {
            self.embed_tokens_weight()
        } else {
            format!("{}.weight", self.top.lm_head)
        }
    }

    /// Checks that the file is self-consistent: every subset layer is a linear role whose
    /// input is the subset's tap, every linear is in exactly one subset, subsets follow the
    /// data flow, and q_norm/k_norm come together.
    fn validate(&self) -> Result<(), String> {
        if !self.block.contains("{i}") {
            return Err(format!("block {:?} has no {{i}}", self.block));
        }
        if self.architectures.is_empty() {
            return Err("architectures is empty".into());
        }
        if self.modules.q_norm.is_some() != self.modules.k_norm.is_some() {
            return Err("modules.q_norm and modules.k_norm must be given together".into());
        }
        let mut seen = Vec::new();
        let mut last_tap = None;
        for s in &self.subsets {
            if last_tap.is_some_and(|t| s.tap < t) {
                return Err(format!(
                    "subset {:?} (tap {}) comes after a later tap; subsets must follow the data flow",
                    s.name,
                    s.tap.name()
                ));
            }
            last_tap = Some(s.tap);
            for layer in &s.layers {
                let role = LinearRole::ALL
                    .into_iter()
                    .find(|r| self.modules.linear(*r) == layer)
                    .ok_or_else(|| {
                        format!(
                            "subset {:?}: layer {layer:?} is not one of the linear modules in [modules]",
                            s.name
                        )
                    })?;
                if role.input_tap() != s.tap {
                    return Err(format!(
                        "subset {:?}: the input of {layer:?} ({}) is observed at tap {}, not {}",
                        s.name,
                        role.name(),
                        role.input_tap().name(),
                        s.tap.name()
                    ));
                }
                if seen.contains(&role) {
                    return Err(format!("layer {layer:?} is in two subsets"));
                }
                seen.push(role);
            }
        }
        if let Some(missing) = LinearRole::ALL.into_iter().find(|r| !seen.contains(r)) {
            return Err(format!(
                "linear {:?} ({}) is in no subset",
                self.modules.linear(missing),
                missing.name()
            ));
        }
        Ok(())
    }

    /// Module name of the linear of `role` in block `i`, e.g. `model.layers.3.mlp.down_proj`.
    pub fn block_linear(&self, i: usize, role: LinearRole) -> String {
        format!("{}.{}", self.block_prefix(i), self.modules.linear(role))
    }

    /// Every quantizable linear module of block `i`.
    pub fn block_linears(&self, i: usize) -> Vec<String> {
        self.block_subsets(i)
            .into_iter()
            .flat_map(|s| s.layers)
            .collect()
    }
}

/// Every bundled family, parsed.
pub fn families() -> Result<Vec<Family>, ArchError> {
    FAMILIES
        .iter()
        .map(|(file, text)| {
            let bad = |message: String| ArchError::BadFamilyFile {
                file: (*file).to_string(),
                message,
            };
            let family = toml::from_str::<Family>(text).map_err(|e| bad(e.to_string()))?;
            family.validate().map_err(bad)?;
            Ok(family)
        })
        .collect()
}

/// The family of a model from its config.json `architectures`.
pub fn family_for(architectures: &[String], config_path: &str) -> Result<Family, ArchError> {
    let all = families()?;
    let supported: Vec<&str> = all
        .iter()
        .flat_map(|f| f.architectures.iter().map(String::as_str))
        .collect();
    let supported = supported.join(", ");
    all.into_iter()
        .find(|f| architectures.iter().any(|a| f.architectures.contains(a)))
        .ok_or_else(|| ArchError::Unsupported {
            found: architectures.to_vec(),
            config: config_path.to_string(),
            supported,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_subsets_follow_the_data_flow() {
        let f = family_for(&["LlamaForCausalLM".into()], "config.json").unwrap();
        let s = f.block_subsets(3);
        let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["qkv", "o", "gate_up", "down"]);
        assert_eq!(
            s[0].layers,
            [
                "model.layers.3.self_attn.q_proj",
                "model.layers.3.self_attn.k_proj",
                "model.layers.3.self_attn.v_proj"
            ]
        );
        assert_eq!(
            s[0].prev_op,
            Some((PrevOpKind::Norm, "model.layers.3.input_layernorm".into()))
        );
        assert_eq!(
            s[1].prev_op,
            Some((PrevOpKind::Linear, "model.layers.3.self_attn.v_proj".into()))
        );
        assert_eq!(
            s[3].prev_op,
            Some((PrevOpKind::Linear, "model.layers.3.mlp.up_proj".into()))
        );
        assert_eq!(f.block_linears(0).len(), 7);
        let taps: Vec<_> = s.iter().map(|s| s.tap).collect();
        assert_eq!(taps, Tap::ALL);
        assert_eq!(
            taps.iter().map(|t| t.rank()).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn every_family_file_parses_and_follows_the_data_flow() {
        let all = families().unwrap();
        let names: Vec<_> = all.iter().map(|f| f.family.as_str()).collect();
        assert_eq!(names, ["llama", "mistral", "qwen2", "qwen3"]);
        let mut archs: Vec<&str> = all
            .iter()
            .flat_map(|f| f.architectures.iter().map(String::as_str))
            .collect();
        let n = archs.len();
        archs.sort();
        archs.dedup();
        assert_eq!(archs.len(), n, "an architecture is claimed by two families");
        for f in &all {
            let s = f.block_subsets(0);
            let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["qkv", "o", "gate_up", "down"], "{}", f.family);
            assert_eq!(s.iter().map(|s| s.tap).collect::<Vec<_>>(), Tap::ALL);
            assert_eq!(f.embed_tokens_weight(), "model.embed_tokens.weight");
            assert_eq!(f.final_norm_weight(), "model.norm.weight");
            assert_eq!(f.lm_head_weight(false), "lm_head.weight");
            assert_eq!(f.lm_head_weight(true), "model.embed_tokens.weight");
            assert_eq!(
                f.block_tensor(7, f.modules.linear(LinearRole::Down), "weight"),
                "model.layers.7.mlp.down_proj.weight"
            );
            assert_eq!(
                f.block_tensor(2, &f.modules.post_attention_norm, "weight"),
                "model.layers.2.post_attention_layernorm.weight"
            );
        }
    }

    #[test]
    fn family_roles_biases_and_qk_norms() {
        use LinearRole::*;
        let fam = |a: &str| family_for(&[a.to_string()], "config.json").unwrap();
        let llama = fam("LlamaForCausalLM");
        assert_eq!(llama.bias_roles(false, false), []);
        assert_eq!(llama.bias_roles(true, false), [Q, K, V, O]);
        assert_eq!(llama.bias_roles(true, true), LinearRole::ALL);
        assert!(llama.modules.q_norm.is_none());

        let mistral = fam("MistralForCausalLM");
        assert_eq!(mistral.family, "mistral");
        assert_eq!(mistral.bias_roles(true, true), []);

        let qwen2 = fam("Qwen2ForCausalLM");
        assert_eq!(qwen2.bias_roles(false, false), [Q, K, V]);
        assert_eq!(
            qwen2.block_tensor(1, qwen2.modules.linear(K), "bias"),
            "model.layers.1.self_attn.k_proj.bias"
        );
        assert!(qwen2.modules.k_norm.is_none());

        let qwen3 = fam("Qwen3ForCausalLM");
        assert_eq!(qwen3.bias_roles(false, false), []);
        assert_eq!(qwen3.bias_roles(true, true), [Q, K, V, O]);
        assert_eq!(qwen3.modules.q_norm.as_deref(), Some("self_attn.q_norm"));
        assert_eq!(qwen3.modules.k_norm.as_deref(), Some("self_attn.k_norm"));

        for r in LinearRole::ALL {
            assert_eq!(llama.modules.linear(r), qwen3.modules.linear(r));
        }
        assert_eq!(Down.input_tap(), Tap::MlpHidden);
        assert_eq!(O.input_tap(), Tap::AttnContext);
    }

    fn parse(text: &str) -> Result<(), String> {
        toml::from_str::<Family>(text)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn inconsistent_family_files_are_refused() {
        let llama = FAMILIES[0].1;
        assert_eq!(parse(llama), Ok(()));
        let e =
            parse(&llama.replacen("tap = \"attn_context\"", "tap = \"mlp_input\"", 1)).unwrap_err();
        assert!(
            e.contains("self_attn.o_proj") && e.contains("attn_context"),
            "{e}"
        );
        let e =
            parse(&llama.replacen("\"mlp.gate_proj\", \"mlp.up_proj\"]", "\"mlp.up_proj\"]", 1))
                .unwrap_err();
        assert!(
            e.contains("mlp.gate_proj") && e.contains("no subset"),
            "{e}"
        );
        let e = parse(&llama.replacen("\"self_attn.k_proj\", ", "\"self_attn.k_pro\", ", 1))
            .unwrap_err();
        assert!(
            e.contains("self_attn.k_pro\"") && e.contains("[modules]"),
            "{e}"
        );
        let e = parse(&llama.replacen(
            "o = \"self_attn.o_proj\"",
            "o = \"self_attn.o_proj\"\nq_norm = \"x\"",
            1,
        ))
        .unwrap_err();
        assert!(e.contains("q_norm"), "{e}");
        let e =
            parse(&llama.replacen("tap = \"attn_input\"", "tap = \"attn_inputs\"", 1)).unwrap_err();
        assert!(e.contains("attn_inputs"), "{e}");
        let e = parse(&llama.replacen("always = []", "always = [\"qq\"]", 1)).unwrap_err();
        assert!(e.contains("qq"), "{e}");
    }

    #[test]
    fn unsupported_architecture_lists_the_supported_ones() {
        let e = family_for(&["GPT2LMHeadModel".into()], "/m/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("/m/config.json"),
            "{e}"
        );
        assert!(
            e.contains("LlamaForCausalLM") && e.contains("MistralForCausalLM"),
            "{e}"
        );
        assert!(
            e.contains("Qwen2ForCausalLM") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
    }
}
