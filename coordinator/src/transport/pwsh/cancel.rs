//! Cancelling the invocation in flight on a session, from outside the call that runs it.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

/// Cancels the invocation in flight on a session, from outside the call that runs it.
#[derive(Debug, Clone)]
pub struct Canceller {
    inflight: Arc<Mutex<Option<String>>>,
    tx: mpsc::UnboundedSender<String>,
}

impl Canceller {
    pub(super) fn new(
        inflight: Arc<Mutex<Option<String>>>,
        tx: mpsc::UnboundedSender<String>,
    ) -> Self {
        Canceller { inflight, tx }
    }

    /// Asks for `key` to be cancelled. True if `key` is the invocation in flight (the request
    /// is then on its way to the target); false if nothing with that key runs here.
    pub fn cancel(&self, key: &str) -> bool {
        let Ok(current) = self.inflight.lock() else {
            return false;
        };
        current.as_deref() == Some(key) && self.tx.send(key.to_string()).is_ok()
    }
}
