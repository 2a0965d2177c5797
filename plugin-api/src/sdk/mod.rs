//! The safe SDK plugin authors write against: implement [`Algorithm`], list the types in
//! [`crate::export_plugin!`], and the SDK builds the root module and the ABI adapters.

mod subset;

pub use subset::{Layer, Subset};

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

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
        contain(|| {
            // SAFETY: the host passes a handle valid for this call.
            let mut subset = unsafe { Subset::from_handle(handle) };
            self.0.transform(&mut subset)
        })
        .into()
    }
}

/// Host calls in progress (on any thread: a plugin's own worker threads panic inside them too).
static CONTAINED_CALLS: AtomicUsize = AtomicUsize::new(0);
/// The first panic of the calls in progress, `panicked at file:line: message`.
static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Installs (once) a panic hook that, during a host call, records the panic for the error
/// [`contain`] returns instead of printing it: the host reports it, naming the plugin, so the
/// default "thread panicked … RUST_BACKTRACE" text would only be noise on the user's terminal.
/// Outside host calls the previous hook runs. A cdylib plugin has its own copy of std, so this
/// hook sees only the plugin's panics.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINED_CALLS.load(Ordering::SeqCst) == 0 {
                return previous(info);
            }
            let at = info
                .location()
                .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            let mut first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| format!("panicked{at}: {}", panic_message(info.payload())));
        }));
    });
}

/// Runs a host call of the plugin, turning a panic into an [`ErrorKind::PANIC`] error with the
/// panic's message and location.
fn contain<T>(f: impl FnOnce() -> Result<T, PluginError>) -> Result<T, PluginError> {
    install_panic_hook();
    if CONTAINED_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
        *FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    let r = catch_unwind(AssertUnwindSafe(f));
    CONTAINED_CALLS.fetch_sub(1, Ordering::SeqCst);
    match r {
        Ok(inner) => inner,
        Err(p) => {
            let recorded = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            let message =
                recorded.unwrap_or_else(|| format!("panicked: {}", panic_message(p.as_ref())));
            Err(PluginError::new(ErrorKind::PANIC, message))
        }
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

extern "C" fn create<A: Algorithm>(params: RStr<'_>) -> RResult<AlgorithmBox, PluginError> {
    contain(|| A::from_params(params.as_str()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_host_call_becomes_an_error_with_its_message_and_location() {
        let line = line!() + 1;
        let e = contain::<()>(|| panic!("deliberate {}", 7)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PANIC);
        let msg = e.message.as_str();
        assert!(
            msg.starts_with("panicked at ")
                && msg.contains(&format!("sdk/mod.rs:{line}:"))
                && msg.ends_with(": deliberate 7"),
            "{msg}"
        );
        // The next call starts clean: an error of its own is passed through unchanged.
        let e = contain::<()>(|| Err(PluginError::other("plain"))).unwrap_err();
        assert_eq!(e.message.as_str(), "plain");
        assert_eq!(contain(|| Ok(3)).unwrap(), 3);
    }
}
