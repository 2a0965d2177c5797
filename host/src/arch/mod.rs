//! Model families as data: one small TOML file per family names the decoder block's modules
//! and its *subsets* (the unit every algorithm transforms). Adding a family is adding a file
//! here and one line to [`FAMILIES`].

use serde::Deserialize;

/// The bundled family files.
const FAMILIES: &[(&str, &str)] = &[("llama.toml", include_str!("llama.toml"))];

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

/// One subset of a block, with module paths relative to the block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsetSpec {
    pub name: String,
    pub layers: Vec<String>,
    pub prev_op: PrevOpSpec,
    /// The module whose output AWQ-style searches compare (module-forward service).
    pub inspect: String,
}

/// A model family: which `architectures` it covers and the subsets of its blocks, in the
/// order the scheduler runs them (the order data flows through the block).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub family: String,
    pub architectures: Vec<String>,
    /// Block module prefix with `{i}` for the block index.
    pub block: String,
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
            })
            .collect()
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
            toml::from_str::<Family>(text).map_err(|e| ArchError::BadFamilyFile {
                file: (*file).to_string(),
                message: e.to_string(),
            })
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
    }
}
