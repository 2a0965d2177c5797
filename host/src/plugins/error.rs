use std::path::PathBuf;

/// Why a plugin could not be found, loaded, instantiated or run.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read plugin file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a loadable shared library: {reason}")]
    NotALibrary { path: PathBuf, reason: String },
    #[error("{path} is not a gs-host plugin: it exports no `gs_plugin_abi_major` symbol (build it with gs_plugin_api::export_plugin!)")]
    NoAbiSymbol { path: PathBuf },
    #[error("{path} was built for plugin ABI major version {found}, but this gs-host speaks ABI major version {expected}; rebuild the plugin against gs-plugin-api {expected}.x or use a gs-host that supports ABI {found}")]
    AbiMajor {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path}: the plugin's root module is incompatible with this host: {reason}")]
    RootModule { path: PathBuf, reason: String },
    #[error("algorithm `{algorithm}` is registered by two plugins: {first} and {second}; remove one of them")]
    DuplicateAlgorithm {
        algorithm: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("plugin `{name}` at {path} has sha256 {actual}, but the manifest pins {expected}; refusing to load it")]
    Sha256Mismatch {
        name: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "the manifest pins plugin `{name}`, but no loaded plugin has that name (loaded: {loaded})"
    )]
    PinnedPluginMissing { name: String, loaded: String },
    #[error("unknown algorithm `{name}`{suggestion}; loaded algorithms: {known}")]
    UnknownAlgorithm {
        name: String,
        suggestion: String,
        known: String,
    },
    #[error("plugin `{plugin}` ({path}) rejected the parameters of `{algorithm}`: {message}")]
    Create {
        plugin: String,
        path: PathBuf,
        algorithm: String,
        message: String,
    },
    #[error("plugin `{plugin}` algorithm `{algorithm}` failed on block {block} subset `{subset}`: {message}")]
    Transform {
        plugin: String,
        algorithm: String,
        block: usize,
        subset: String,
        message: String,
    },
}
