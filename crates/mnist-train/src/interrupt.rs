//! Ctrl-C (SIGINT) and SIGTERM during training: the first signal asks the training loop to stop at the
//! next batch boundary (the last complete epoch's checkpoint stays on disk); a second one quits at once
//! with status 130.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::SigId;

use crate::TrainError;

/// The exit status of a program stopped by Ctrl-C (128 + SIGINT).
pub const INTERRUPTED_EXIT_CODE: u8 = 130;

/// A stop request set by SIGINT or SIGTERM while this value lives; the handlers are removed on drop.
#[derive(Debug)]
pub struct Interrupt {
    flag: Arc<AtomicBool>,
    ids: Vec<SigId>,
}

impl Interrupt {
    /// Installs the handlers. The first signal sets the flag; a second one (flag already set) ends the
    /// process at once with status [`INTERRUPTED_EXIT_CODE`].
    pub fn install() -> Result<Self, TrainError> {
        let flag = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::with_capacity(4);
        for signal in [SIGINT, SIGTERM] {
            // Registered first, so it sees the flag as it was before this signal.
            let shutdown = signal_hook::flag::register_conditional_shutdown(
                signal,
                i32::from(INTERRUPTED_EXIT_CODE),
                flag.clone(),
            );
            let set = shutdown.and_then(|a| {
                ids.push(a);
                signal_hook::flag::register(signal, flag.clone())
            });
            match set {
                Ok(id) => ids.push(id),
                Err(source) => {
                    for id in ids {
                        signal_hook::low_level::unregister(id);
                    }
                    return Err(TrainError::Config(format!(
                        "cannot install the handler of signal {signal}: {source}"
                    )));
                }
            }
        }
        Ok(Self { flag, ids })
    }

    /// The flag the training loop polls (true once a stop was requested).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// True once a signal asked to stop.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigterm_sets_the_flag_instead_of_killing() {
        let interrupt = Interrupt::install().unwrap();
        assert!(!interrupt.requested());
        signal_hook::low_level::raise(SIGTERM).unwrap();
        assert!(
            interrupt.requested(),
            "the first SIGTERM must only set the flag"
        );
        assert!(interrupt.flag().load(Ordering::SeqCst));
        // A second signal would end the test process: the handlers are removed instead.
        drop(interrupt);
    }
}
