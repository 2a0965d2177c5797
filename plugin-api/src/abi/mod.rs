//! The binary interface between gs-host and a plugin `.so`, major version [`ABI_MAJOR`].
//!
//! # Evolution rules (see `docs/ARCHITECTURE.md`)
//! - What a plugin *provides* (the root module [`PluginMod`], [`AlgorithmEntry`], the
//!   [`AlgorithmAbi`] vtable and every type in their signatures) is layout-checked by abi_stable
//!   at load time. Prefix types grow only after their `last_prefix_field`.
//! - What the host *provides* ([`HostServices`]) crosses the boundary as an erased pointer inside
//!   [`SubsetHandle`], so a host whose table grew still loads older plugins (abi_stable would
//!   otherwise refuse them with "too many fields"). Each side reads the table through its own
//!   version of the prefix type; services added after the v1.0 `last_prefix_field` read as
//!   `None` in an older host, and the SDK degrades.
//! - Plain `#[repr(C)]` value types returned by host services ([`LayerInfo`], [`AbiScheme`], …)
//!   are not checked (they sit behind the erased pointer): they are frozen for the whole major
//!   version. Never reorder, resize or remove anything within a major version.

#![allow(non_local_definitions)] // emitted by `#[sabi_trait]` (abi_stable 0.11)

mod host;
mod types;

pub use host::*;
pub use types::*;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RStr, RVec},
    StableAbi,
};

/// Major version of the plugin ABI. A plugin built for another major is refused by name.
pub const ABI_MAJOR: u32 = 1;

/// Name of the plain C symbol (`extern "C" fn() -> u32`) every plugin exports with its ABI major.
///
/// The host reads it with a plain `dlsym` *before* abi_stable's layout checks, so a plugin of
/// another major version gets a message naming both versions instead of a layout diff.
pub const ABI_MAJOR_SYMBOL: &[u8] = b"gs_plugin_abi_major";

/// The root module a plugin exports (one per `.so`).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// [`ABI_MAJOR`] of the plugin-api the plugin was built against.
    pub abi_major: u32,
    /// Plugin name (unique per vendor), e.g. `gs-rtn`.
    pub name: RStr<'static>,
    /// The plugin's own version (its crate version).
    pub version: RStr<'static>,
    /// Who ships it.
    pub vendor: RStr<'static>,
    /// Full version of `gs-plugin-api` the plugin was built against, e.g. `1.1.0`.
    pub api_version: RStr<'static>,
    /// The algorithms this plugin registers, each with its constructor.
    #[sabi(last_prefix_field)]
    pub algorithms: extern "C" fn() -> RVec<AlgorithmEntry>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "gs_plugin";
    const NAME: &'static str = "gs-host plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// One algorithm a plugin registers.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct AlgorithmEntry {
    /// The name used in a manifest's `[[pipeline]] algorithm = "…"`.
    pub name: RStr<'static>,
    /// One line for `gs-host plugins`.
    pub summary: RStr<'static>,
    /// Builds the algorithm from its manifest parameter table, serialized as TOML text.
    /// Bad parameters are an `InvalidParams` error that says which key and what was expected.
    pub create: extern "C" fn(params_toml: RStr<'_>) -> RResult<AlgorithmBox, PluginError>,
}

/// An algorithm instance: transforms one subset at a time.
///
/// Plugin authors implement the safe [`crate::Algorithm`] trait instead; the SDK adapts it and
/// turns panics into [`ErrorKind::PANIC`] errors before they can cross the boundary.
#[sabi_trait]
pub trait AlgorithmAbi: Send {
    /// Calibration statistics this algorithm needs for every subset input.
    fn required_stats(&self) -> StatsRequest;

    /// Transforms one subset through the host services behind `subset`.
    #[sabi(last_prefix_field)]
    fn transform_subset(&mut self, subset: SubsetHandle) -> RResult<(), PluginError>;
}

/// Owned algorithm object as it crosses the boundary.
pub type AlgorithmBox = AlgorithmAbi_TO<'static, RBox<()>>;

impl std::fmt::Debug for AlgorithmEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlgorithmEntry")
            .field("name", &self.name.as_str())
            .field("summary", &self.summary.as_str())
            .finish_non_exhaustive()
    }
}
