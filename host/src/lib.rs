//! gs-host: the stable-ABI host of the gs post-training quantization toolkit.
//!
//! Data flows manifest → plugins → model → blocks → subsets → plugin chain → export;
//! see `docs/ARCHITECTURE.md`.

pub mod arch;
pub mod cli;
pub mod data;
pub mod device;
pub mod eval;
pub mod export;
pub mod manifest;
pub mod model;
pub mod plugins;
pub mod scheduler;
pub mod stats;
