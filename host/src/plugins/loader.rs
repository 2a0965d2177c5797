//! Loading plugin libraries through abi_stable and instantiating their algorithms.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abi_stable::library::lib_header_from_path;
use abi_stable::std_types::RStr;
use gs_plugin_api::abi::{
    AlgorithmBox, AlgorithmEntry, PluginModRef, StatsRequest, ABI_MAJOR, ABI_MAJOR_SYMBOL,
};
use sha2::{Digest, Sha256};

use super::discover::{discover, PluginSource, SearchPath};
use super::PluginError;

/// A plugin library that passed every load-time check.
#[derive(Debug)]
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub source: PluginSource,
    pub sha256: String,
    pub name: String,
    pub version: String,
    pub vendor: String,
    pub abi_major: u32,
    /// gs-plugin-api version the plugin was built against.
    pub api_version: String,
    /// `(name, summary)` of each registered algorithm.
    pub algorithms: Vec<(String, String)>,
    entries: Vec<AlgorithmEntry>,
}

/// A manifest pin: `[plugins.<name>] sha256 = "…"`, optionally with the file's `path`.
#[derive(Debug, Clone)]
pub struct Pin {
    pub sha256: String,
    pub path: Option<PathBuf>,
}

/// Every loaded plugin and the algorithm-name index over them.
#[derive(Debug, Default)]
pub struct PluginRegistry {
    plugins: Vec<Arc<LoadedPlugin>>,
    by_algorithm: BTreeMap<String, (usize, usize)>,
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, PluginError> {
    let bytes = std::fs::read(path).map_err(|e| PluginError::ReadFile {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// An error with its sources (libloading's own text is only "dlopen failed"; the reason the
/// system gave, e.g. "invalid ELF header", is its source).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// Reads the plain `gs_plugin_abi_major` symbol before abi_stable looks at anything, so a plugin
/// of another major gets a message naming both versions instead of a layout diff.
fn read_abi_major(path: &Path) -> Result<u32, PluginError> {
    // SAFETY: loading a library runs its initialisers; the caller accepted that by putting it
    // on the plugin search path (docs/SECURITY.md). The library is leaked, never unloaded,
    // because abi_stable keeps pointers into it.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| PluginError::NotALibrary {
        path: path.to_path_buf(),
        reason: with_sources(&e),
    })?;
    let major = {
        // SAFETY: the symbol is declared `extern "C" fn() -> u32` by export_plugin!.
        let sym: Result<libloading::Symbol<'_, extern "C" fn() -> u32>, _> =
            unsafe { lib.get(ABI_MAJOR_SYMBOL) };
        match sym {
            Ok(f) => f(),
            Err(_) => {
                return Err(PluginError::NoAbiSymbol {
                    path: path.to_path_buf(),
                })
            }
        }
    };
    std::mem::forget(lib);
    Ok(major)
}

impl LoadedPlugin {
    /// Loads one plugin file: ABI major, then abi_stable's version and layout checks.
    pub fn load(path: &Path, source: PluginSource) -> Result<Self, PluginError> {
        let sha256 = sha256_file(path)?;
        let found = read_abi_major(path)?;
        if found != ABI_MAJOR {
            return Err(PluginError::AbiMajor {
                path: path.to_path_buf(),
                found,
                expected: ABI_MAJOR,
            });
        }
        let root = lib_header_from_path(path)
            .and_then(|h| h.init_root_module::<PluginModRef>())
            .map_err(|e| PluginError::RootModule {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if root.abi_major() != ABI_MAJOR {
            return Err(PluginError::AbiMajor {
                path: path.to_path_buf(),
                found: root.abi_major(),
                expected: ABI_MAJOR,
            });
        }
        let entries: Vec<AlgorithmEntry> = (root.algorithms())().into_vec();
        Ok(LoadedPlugin {
            path: path.to_path_buf(),
            source,
            sha256,
            name: root.name().to_string(),
            version: root.version().to_string(),
            vendor: root.vendor().to_string(),
            abi_major: root.abi_major(),
            api_version: root.api_version().to_string(),
            algorithms: entries
                .iter()
                .map(|e| (e.name.to_string(), e.summary.to_string()))
                .collect(),
            entries,
        })
    }
}

/// The pin whose `path` is `path`, checked against the file's `sha256` before the library is
/// opened (a mismatch runs none of its code).
pub fn check_pinned_path(
    path: &Path,
    sha256: &str,
    pins: &BTreeMap<String, Pin>,
) -> Result<(), PluginError> {
    match pins.iter().find(|(_, p)| p.path.as_deref() == Some(path)) {
        Some((name, pin)) if pin.sha256 != sha256 => Err(PluginError::Sha256Mismatch {
            name: name.clone(),
            path: path.to_path_buf(),
            expected: pin.sha256.clone(),
            actual: sha256.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The pin of a loaded plugin (by its name), if the manifest has one.
pub fn check_pin(plugin: &LoadedPlugin, pins: &BTreeMap<String, Pin>) -> Result<(), PluginError> {
    match pins.get(&plugin.name) {
        Some(pin) if pin.sha256 != plugin.sha256 => Err(PluginError::Sha256Mismatch {
            name: plugin.name.clone(),
            path: plugin.path.clone(),
            expected: pin.sha256.clone(),
            actual: plugin.sha256.clone(),
        }),
        _ => Ok(()),
    }
}

impl PluginRegistry {
    /// Discovers and loads every plugin on `search`, applying the manifest's `pins`.
    ///
    /// Built-in plugins that are not gs-host plugins are skipped (cargo's output directory
    /// holds other libraries); anywhere else that is an error. A plugin from an explicit
    /// directory shadows a built-in one registering the same algorithm; two explicit plugins
    /// registering the same algorithm are an error naming both files.
    pub fn load(search: &SearchPath, pins: &BTreeMap<String, Pin>) -> Result<Self, PluginError> {
        let mut search = search.clone();
        for pin in pins.values() {
            if let Some(p) = &pin.path {
                // Checked before the library is ever opened: a pinned path runs no unverified code.
                search.files.push((p.clone(), PluginSource::Pinned));
            }
        }
        let files = discover(&search)?;
        let mut reg = PluginRegistry::default();
        for (path, source) in files {
            if source == PluginSource::Pinned {
                check_pinned_path(&path, &sha256_file(&path)?, pins)?;
            }
            let plugin = match LoadedPlugin::load(&path, source) {
                Ok(p) => p,
                Err(e @ (PluginError::NotALibrary { .. } | PluginError::NoAbiSymbol { .. }))
                    if source == PluginSource::BuiltIn =>
                {
                    tracing::debug!("skipping {}: {e}", path.display());
                    continue;
                }
                Err(e) => return Err(e),
            };
            reg.add(plugin)?;
        }
        reg.check_pins(pins)?;
        Ok(reg)
    }

    /// Adds a loaded plugin, resolving algorithm-name clashes: an explicit plugin shadows a
    /// built-in one; two explicit (or two built-in) plugins with one algorithm are an error.
    pub fn add(&mut self, plugin: LoadedPlugin) -> Result<(), PluginError> {
        let pi = self.plugins.len();
        let builtin = plugin.source == PluginSource::BuiltIn;
        let mut claims = Vec::new();
        for (ai, (name, _)) in plugin.algorithms.iter().enumerate() {
            match self.by_algorithm.get(name).map(|&(p, _)| &self.plugins[p]) {
                None => claims.push((name.clone(), ai)),
                Some(other) if (other.source == PluginSource::BuiltIn) == builtin => {
                    return Err(PluginError::DuplicateAlgorithm {
                        algorithm: name.clone(),
                        first: other.path.clone(),
                        second: plugin.path.clone(),
                    })
                }
                Some(other) => {
                    let (winner, loser) = if builtin {
                        (&other.path, &plugin.path)
                    } else {
                        claims.push((name.clone(), ai));
                        (&plugin.path, &other.path)
                    };
                    tracing::info!(
                        "algorithm `{name}` from {} shadows the built-in {}",
                        winner.display(),
                        loser.display()
                    );
                }
            }
        }
        for (name, ai) in claims {
            self.by_algorithm.insert(name, (pi, ai));
        }
        self.plugins.push(Arc::new(plugin));
        Ok(())
    }

    fn check_pins(&self, pins: &BTreeMap<String, Pin>) -> Result<(), PluginError> {
        for name in pins.keys() {
            let candidates: Vec<_> = self.plugins.iter().filter(|p| &p.name == name).collect();
            if candidates.is_empty() {
                return Err(PluginError::PinnedPluginMissing {
                    name: name.clone(),
                    loaded: self.plugin_names(),
                });
            }
            for p in candidates {
                check_pin(p, pins)?;
            }
        }
        Ok(())
    }

    fn plugin_names(&self) -> String {
        if self.plugins.is_empty() {
            return "none".into();
        }
        let v: Vec<_> = self.plugins.iter().map(|p| p.name.as_str()).collect();
        v.join(", ")
    }

    /// Every loaded plugin, in load order.
    pub fn plugins(&self) -> &[Arc<LoadedPlugin>] {
        &self.plugins
    }

    /// The plugin that provides `algorithm`, if any.
    pub fn provider(&self, algorithm: &str) -> Option<&Arc<LoadedPlugin>> {
        self.by_algorithm
            .get(algorithm)
            .map(|&(p, _)| &self.plugins[p])
    }

    /// Names of every registered algorithm, sorted.
    pub fn algorithm_names(&self) -> Vec<&str> {
        self.by_algorithm.keys().map(String::as_str).collect()
    }

    /// Instantiates `algorithm` with its parameter table (TOML text).
    pub fn create(
        &self,
        algorithm: &str,
        params_toml: &str,
    ) -> Result<AlgorithmInstance, PluginError> {
        let Some(&(pi, ai)) = self.by_algorithm.get(algorithm) else {
            let known = self.algorithm_names();
            let suggestion = known
                .iter()
                .map(|k| (strsim::levenshtein(k, algorithm), *k))
                .filter(|(d, k)| *d <= 2.max(k.len() / 3))
                .min()
                .map(|(_, k)| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            return Err(PluginError::UnknownAlgorithm {
                name: algorithm.to_string(),
                suggestion,
                known: if known.is_empty() {
                    "none (no plugins found; see `gs-host plugins`)".into()
                } else {
                    known.join(", ")
                },
            });
        };
        let plugin = Arc::clone(&self.plugins[pi]);
        let entry = plugin.entries[ai];
        let obj: AlgorithmBox = (entry.create)(RStr::from_str(params_toml))
            .into_result()
            .map_err(|e| PluginError::Create {
                plugin: plugin.name.clone(),
                path: plugin.path.clone(),
                algorithm: algorithm.to_string(),
                message: e.message.to_string(),
            })?;
        let required = obj.required_stats();
        Ok(AlgorithmInstance {
            plugin,
            name: algorithm.to_string(),
            obj,
            required,
        })
    }
}

/// One configured algorithm of the pipeline.
pub struct AlgorithmInstance {
    pub plugin: Arc<LoadedPlugin>,
    pub name: String,
    pub(super) obj: AlgorithmBox,
    /// Statistics it asked for when it was created.
    pub required: StatsRequest,
}

impl std::fmt::Debug for AlgorithmInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (plugin {})", self.name, self.plugin.name)
    }
}
