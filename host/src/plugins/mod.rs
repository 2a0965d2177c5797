//! Plugin discovery, loading and the host side of the ABI.
//!
//! Loading a plugin runs its code (dlopen), so see `docs/SECURITY.md` for what is checked
//! before and after.

mod discover;
mod error;
mod loader;
mod services;

pub use discover::{discover, PluginSource, SearchPath};
pub use error::PluginError;
pub use loader::{
    check_pin, check_pinned_path, sha256_file, AlgorithmInstance, LoadedPlugin, Pin, PluginRegistry,
};
pub use services::{LayerState, ModuleForward, PrevOpState, SubsetRun};
