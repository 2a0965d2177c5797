//! Quantization primitives shared by gs-host and every plugin.
pub mod scheme;
pub use scheme::*;
