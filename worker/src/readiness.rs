//! Whether the worker can take work now: what its `/readyz` answers (and
//! the gRPC health service of its `--http` port). The agent says when it is
//! registered, lost its session or drains; the main function says when the
//! models are loaded. Cloning shares the state.

use std::sync::Arc;

use tokio::sync::watch;

/// The worker's readiness; starts not ready ("loading models").
#[derive(Clone, Debug)]
pub struct Readiness {
    /// `None` when ready, else why not (one line); watchable, so the gRPC
    /// health service follows it.
    why_not: Arc<watch::Sender<Option<String>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            why_not: Arc::new(watch::Sender::new(Some("loading models".into()))),
        }
    }
}

impl Readiness {
    /// Marks the worker ready: registered, with its models loadable.
    pub fn ready(&self) {
        self.set(None);
    }

    /// Marks the worker not ready, with the reason on one line.
    pub fn not_ready(&self, why: &str) {
        let line = why.split_whitespace().collect::<Vec<_>>().join(" ");
        self.set(Some(line));
    }

    /// Returns `Ok` when ready, else the reason.
    ///
    /// # Errors
    /// The reason the worker cannot take work now.
    pub fn check(&self) -> Result<(), String> {
        match self.why_not.borrow().as_ref() {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Returns a receiver that sees every change (`None`: ready).
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.why_not.subscribe()
    }

    fn set(&self, value: Option<String>) {
        self.why_not.send_replace(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_loading_and_follows_the_agent() {
        let r = Readiness::default();
        assert_eq!(r.check(), Err("loading models".into()));
        let shared = r.clone();
        shared.ready();
        assert_eq!(r.check(), Ok(()));
        shared.not_ready("cannot register:\n  connection refused");
        assert_eq!(r.check(), Err("cannot register: connection refused".into()));
    }
}
