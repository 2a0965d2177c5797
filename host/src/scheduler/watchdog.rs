//! The time limit of one plugin call (`[run] stage_timeout_s`).
//!
//! A thread stuck in a plugin cannot be stopped from the outside (there is no safe way to
//! cancel a thread, and the plugin's code owns its stack), so when a call overruns the
//! watchdog ends the whole process: it removes the uncommitted staging directories (the
//! output never appears), prints the error and exits with status 1. The calling thread is
//! kept from touching anything afterwards: the watchdog holds the lock the caller needs to
//! disarm it while it cleans up and exits.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// The call being timed: its deadline and what it is, for the error.
    armed: Option<(Instant, String)>,
    stop: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // Nothing panics while holding it; should something, the state is still valid.
    shared.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Times plugin calls; see the module docs.
pub(crate) struct Watchdog {
    shared: Shared,
    limit: Duration,
    thread: Option<JoinHandle<()>>,
}

/// A call being timed; dropping it (when the call returns) disarms the watchdog.
pub(crate) struct Armed<'w> {
    watchdog: &'w Watchdog,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        lock(&self.watchdog.shared).armed = None;
    }
}

impl Watchdog {
    /// A watchdog whose calls may take up to `limit`.
    pub fn new(limit: Duration) -> Watchdog {
        let shared: Shared = Arc::default();
        let watched = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("gs-stage-watchdog".into())
            .spawn(move || watch(&watched, limit))
            .ok();
        if thread.is_none() {
            tracing::warn!(
                "could not start the stage watchdog thread; [run] stage_timeout_s is not enforced"
            );
        }
        Watchdog {
            shared,
            limit,
            thread,
        }
    }

    /// Starts timing a call; `what` names it in the error (plugin, algorithm, block, subset).
    pub fn arm(&self, what: String) -> Armed<'_> {
        let mut state = lock(&self.shared);
        state.armed = Some((Instant::now() + self.limit, what));
        self.shared.1.notify_all();
        Armed { watchdog: self }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(shared: &Shared, limit: Duration) {
    let mut state = lock(shared);
    loop {
        if state.stop {
            return;
        }
        let deadline = state.armed.as_ref().map(|(d, _)| *d);
        state = match deadline {
            None => shared.1.wait(state).unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    let what = state.armed.as_ref().map_or("", |(_, w)| w.as_str());
                    // Still holding the lock: the stuck call cannot disarm and go on writing.
                    crate::export::discard_uncommitted();
                    eprintln!(
                        "error: {what} did not finish within {} s ([run] stage_timeout_s); the run was abandoned and no output was written",
                        limit.as_secs_f64()
                    );
                    std::process::exit(1);
                }
                shared
                    .1
                    .wait_timeout(state, d - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_within_the_limit_disarm_and_the_thread_stops() {
        // (The expiry ends the process; the corpus test `plugin taking forever` covers it.)
        let w = Watchdog::new(Duration::from_secs(5));
        for i in 0..3 {
            let armed = w.arm(format!("call {i}"));
            std::thread::sleep(Duration::from_millis(5));
            drop(armed);
            assert!(lock(&w.shared).armed.is_none());
        }
        drop(w); // joins the thread: would hang if it missed the stop
    }
}
