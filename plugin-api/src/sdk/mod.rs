//! The safe SDK plugin authors write against: implement [`Algorithm`], list the types in
//! [`crate::export_plugin!`], and the SDK builds the root module and the ABI adapters.

mod subset;

pub use subset::{Layer, Subset};

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RStr},
};

use crate::abi::{
    AlgorithmAbi, AlgorithmAbi_TO, AlgorithmBox, AlgorithmEntry, ErrorKind, PluginError,
    StatsRequest, SubsetHandle,
};

/// A quantization algorithm: transforms one subset at a time.
pub trait Algorithm: Send + Sized + 'static {
    /// Name used in manifests (`[[pipeline]] algorithm = "…"`); unique across loaded plugins.
    const NAME: &'static str;
    /// One line shown by `gs-host plugins`.
    const SUMMARY: &'static str;

    /// Builds the algorithm from its parameter table (TOML text; see [`crate::parse_params`]).
    fn from_params(params_toml: &str) -> Result<Self, PluginError>;

    /// Statistics of every subset input the host must provide before [`Algorithm::transform`].
    fn required_stats(&self) -> StatsRequest {
        StatsRequest::NONE
    }

    /// Transforms the subset in place through its setters.
    fn transform(&mut self, subset: &mut Subset<'_>) -> Result<(), PluginError>;
}

/// Adapts a safe [`Algorithm`] to the ABI trait, containing panics.
struct Adapter<A>(A);

impl<A: Algorithm> AlgorithmAbi for Adapter<A> {
    fn required_stats(&self) -> StatsRequest {
        catch_unwind(AssertUnwindSafe(|| self.0.required_stats()))
            // A panic here cannot be reported as an error; asking for nothing lets the
            // transform call (which runs next) report it.
            .unwrap_or(StatsRequest::NONE)
    }

    fn transform_subset(&mut self, handle: SubsetHandle) -> RResult<(), PluginError> {
        let r = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: the host passes a handle valid for this call.
            let mut subset = unsafe { Subset::from_handle(handle) };
            self.0.transform(&mut subset)
        }));
        flatten(r).into()
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

fn flatten<T>(r: std::thread::Result<Result<T, PluginError>>) -> Result<T, PluginError> {
    match r {
        Ok(inner) => inner,
        Err(p) => Err(PluginError::new(
            ErrorKind::PANIC,
            format!("panicked: {}", panic_message(p.as_ref())),
        )),
    }
}

extern "C" fn create<A: Algorithm>(params: RStr<'_>) -> RResult<AlgorithmBox, PluginError> {
    let r = catch_unwind(AssertUnwindSafe(|| A::from_params(params.as_str())));
    flatten(r)
        .map(|a| AlgorithmAbi_TO::from_value(Adapter(a), TD_Opaque))
        .into()
}

/// The registry entry of algorithm `A` (used by [`crate::export_plugin!`]).
pub fn entry<A: Algorithm>() -> AlgorithmEntry {
    AlgorithmEntry {
        name: RStr::from_str(A::NAME),
        summary: RStr::from_str(A::SUMMARY),
        create: create::<A>,
    }
}
