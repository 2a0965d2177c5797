//! gs-plugin-api: the stable ABI between gs-host and algorithm plugins, and the safe SDK
//! plugin authors use.
//!
//! A plugin is a `cdylib` crate that depends on this crate and on `abi_stable` (the export
//! attribute expands to `::abi_stable` paths), implements [`Algorithm`] for each algorithm and
//! exports them once:
//!
//! ```ignore
//! use gs_plugin_api::{export_plugin, parse_params, Algorithm, PluginError, Subset};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Params { strength: f32 }
//!
//! struct Shrink(Params);
//!
//! impl Algorithm for Shrink {
//!     const NAME: &'static str = "shrink";
//!     const SUMMARY: &'static str = "multiplies every weight by a constant";
//!     fn from_params(text: &str) -> Result<Self, PluginError> {
//!         Ok(Shrink(parse_params(Self::NAME, text)?))
//!     }
//!     fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError> {
//!         for i in 0..subset.len() {
//!             let w: Vec<f32> = subset.weight(i)?.iter().map(|v| v * self.0.strength).collect();
//!             subset.set_weight(i, &w)?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! export_plugin! { name: "shrink-plugin", vendor: "Example Inc.", algorithms: [Shrink] }
//! ```
//!
//! Everything that crosses the boundary lives in [`abi`]; see its docs for the evolution rules.

pub mod abi;
mod params;
mod scheme;
pub mod sdk;

pub use abi::{ErrorKind, LogLevel, PluginError, PrevOpKind, StatKind, StatsRequest};
pub use params::parse_params;
pub use sdk::{Algorithm, Layer, Subset};

/// The shared quantization primitives (rounding, scales, packing): use them, never re-implement.
pub use gs_quant as quant;

#[doc(hidden)]
pub use abi_stable;

/// Version of this crate, recorded in every plugin's root module.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exports the plugin's root module and ABI-major symbol. Call once, at the crate root.
///
/// ```ignore
/// export_plugin! { name: "gs-rtn", vendor: "gs-host", algorithms: [Rtn] }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, vendor: $vendor:expr, algorithms: [$($algo:ty),+ $(,)?] $(,)?) => {
        /// ABI major, read by the host with a plain symbol lookup before any layout check.
        #[no_mangle]
        pub extern "C" fn gs_plugin_abi_major() -> u32 {
            $crate::abi::ABI_MAJOR
        }

        extern "C" fn __gs_plugin_algorithms(
        ) -> $crate::abi_stable::std_types::RVec<$crate::abi::AlgorithmEntry> {
            let v: ::std::vec::Vec<$crate::abi::AlgorithmEntry> =
                ::std::vec![$($crate::sdk::entry::<$algo>()),+];
            v.into()
        }

        #[::abi_stable::export_root_module]
        pub fn __gs_plugin_root_module() -> $crate::abi::PluginModRef {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            use $crate::abi_stable::std_types::RStr;
            $crate::abi::PluginMod {
                abi_major: $crate::abi::ABI_MAJOR,
                name: RStr::from_str($name),
                version: RStr::from_str(env!("CARGO_PKG_VERSION")),
                vendor: RStr::from_str($vendor),
                api_version: RStr::from_str($crate::API_VERSION),
                algorithms: __gs_plugin_algorithms,
            }
            .leak_into_prefix()
        }
    };
}
