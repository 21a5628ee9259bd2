//! SIGINT and SIGTERM in `hv run`: an orderly stop of every domain.
//!
//! [`ShutdownSignals::install`] blocks both signals in the calling thread before any
//! other thread exists, so every thread hv starts inherits the mask and none is
//! interrupted, and starts one thread that takes them with `sigwait`. On the first
//! signal that thread stops every watched domain, in order ([`DomainShared::finish`]
//! with [`Outcome::Destroyed`]): the vCPUs leave the guest, and each domain's thread
//! destroys it as when it shuts down (back-ends stopped: a PV block request in
//! progress finishes and the image is `fdatasync`'d). `hv run` then prints its
//! summary and statistics and exits with 128 + the signal's number. A second signal
//! while that runs ends the process at once with 128 + its number, so a stuck stop
//! cannot keep hv alive.
//!
//! The kick signal that takes vCPUs out of `KVM_RUN` (SIGRTMIN) is not blocked.

use std::sync::{Arc, Mutex, Weak};

use thiserror::Error;

use crate::domain::DomainShared;
use crate::outcome::Outcome;

/// The signals that stop `hv run`.
pub const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Errors setting up signal handling.
#[derive(Debug, Error)]
pub enum SignalError {
    /// The signal mask could not be changed.
    #[error("cannot block SIGINT and SIGTERM: {0}")]
    Mask(#[source] std::io::Error),
    /// The thread that waits for the signals could not be started.
    #[error("cannot start the signal thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The name of a stopping signal (`SIGINT`, `SIGTERM`), else its number.
pub fn name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// The exit status that stands for `signal`: 128 + its number (130 for SIGINT, 143
/// for SIGTERM), as a shell reports a process a signal ended.
pub fn exit_status(signal: libc::c_int) -> u8 {
    u8::try_from(128 + signal).unwrap_or(u8::MAX)
}

#[derive(Debug, Default)]
struct State {
    /// The first signal received.
    signal: Option<libc::c_int>,
    /// The domains to stop, in order.
    domains: Vec<Weak<DomainShared>>,
}

/// SIGINT and SIGTERM, taken by a thread of their own; see the module documentation.
#[derive(Debug, Clone)]
pub struct ShutdownSignals {
    state: Arc<Mutex<State>>,
}

impl ShutdownSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread started
    /// from it afterwards) and starts the thread that waits for them. Call it before any
    /// other thread is started: a thread started earlier keeps the default action
    /// (the process dies at once).
    pub fn install() -> Result<ShutdownSignals, SignalError> {
        let set = vmm_sys_util::signal::create_sigset(&SIGNALS)
            .map_err(|e| SignalError::Mask(std::io::Error::from_raw_os_error(e.errno())))?;
        // SAFETY: `set` is an initialised signal set; the old mask is not asked for.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SignalError::Mask(std::io::Error::from_raw_os_error(rc)));
        }
        let me = ShutdownSignals {
            state: Arc::new(Mutex::new(State::default())),
        };
        let waiter = me.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || waiter.wait_loop(set))
            .map_err(SignalError::Thread)?;
        Ok(me)
    }

    /// Stops `domains` when a signal arrives, or at once if one has arrived already.
    pub fn watch<'a>(&self, domains: impl IntoIterator<Item = &'a Arc<DomainShared>>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let new: Vec<Weak<DomainShared>> = domains.into_iter().map(Arc::downgrade).collect();
        if st.signal.is_some() {
            stop(&new);
        }
        st.domains.extend(new);
    }

    /// The first signal received, if any.
    pub fn received(&self) -> Option<libc::c_int> {
        self.state.lock().ok().and_then(|st| st.signal)
    }

    fn wait_loop(&self, set: libc::sigset_t) {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` holds signals blocked in this thread; `sig` is a live int.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                tracing::error!(error = %std::io::Error::from_raw_os_error(rc), "sigwait failed");
                return;
            }
            self.on_signal(sig);
        }
    }

    fn on_signal(&self, sig: libc::c_int) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if st.signal.is_some() {
            eprintln!(
                "hv: {} again while stopping: exiting now, without the summary",
                name(sig)
            );
            // SAFETY: ends the process at once; no Rust state is used afterwards (exit
            // handlers are not run, as other threads may still be running).
            unsafe { libc::_exit(i32::from(exit_status(sig))) };
        }
        st.signal = Some(sig);
        eprintln!(
            "hv: {}: stopping every domain (a second signal exits at once)",
            name(sig)
        );
        stop(&st.domains);
    }
}

fn stop(domains: &[Weak<DomainShared>]) {
    for d in domains.iter().filter_map(Weak::upgrade) {
        d.finish(Outcome::Destroyed);
    }
}
