//! The live-session registry: each host's open agent session (its outbound channel, so
//! commands reach the host, and a token that closes it) and last-seen times. Below the
//! services: the session handler registers, the job launcher and the operator RPCs send
//! through it, the host views read it.

use std::collections::HashMap;
use std::sync::Mutex;

use drover_proto::v1;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// What the controller sends an agent through its session.
pub type Outbound = mpsc::Sender<Result<v1::ControllerMessage, Status>>;

#[derive(Debug)]
struct Live {
    id: u64,
    cancel: CancellationToken,
    tx: Outbound,
}

#[derive(Debug, Default)]
struct Entry {
    session: Option<Live>,
    last_seen_ms: i64,
}

/// Live sessions (with their outbound channel, so commands reach the host) and last-seen
/// times, by host.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<HashMap<String, Entry>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Woken at each new session, for [`Registry::wait_connected`].
    registered: tokio::sync::Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new session for `host` sending through `tx`, closing any older one (the
    /// newest connection wins).
    pub fn register(&self, host: &str, now_ms: i64, tx: Outbound) -> (u64, CancellationToken) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let cancel = CancellationToken::new();
        let mut map = self.lock();
        let entry = map.entry(host.to_string()).or_default();
        let live = Live {
            id,
            cancel: cancel.clone(),
            tx,
        };
        if let Some(old) = entry.session.replace(live) {
            old.cancel.cancel();
        }
        entry.last_seen_ms = now_ms;
        drop(map);
        self.registered.notify_waiters();
        (id, cancel)
    }

    /// Returns once `host` has an open session.
    pub async fn wait_connected(&self, host: &str) {
        loop {
            let registered = self.registered.notified();
            tokio::pin!(registered);
            registered.as_mut().enable();
            if self.seen(host).1 {
                return;
            }
            registered.await;
        }
    }

    /// The outbound channel of `host`'s open session.
    pub fn sender(&self, host: &str) -> Option<Outbound> {
        self.lock()
            .get(host)
            .and_then(|e| e.session.as_ref())
            .map(|live| live.tx.clone())
    }

    pub fn touch(&self, host: &str, now_ms: i64) {
        if let Some(entry) = self.lock().get_mut(host) {
            entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
        }
    }

    pub fn unregister(&self, host: &str, id: u64) {
        if let Some(entry) = self.lock().get_mut(host)
            && entry.session.as_ref().is_some_and(|live| live.id == id)
        {
            entry.session = None;
        }
    }

    /// Closes the host's session, if any. Returns whether one was open.
    pub fn close(&self, host: &str) -> bool {
        match self.lock().get_mut(host).and_then(|e| e.session.take()) {
            Some(live) => {
                live.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub fn close_all(&self) {
        for entry in self.lock().values_mut() {
            if let Some(live) = entry.session.take() {
                live.cancel.cancel();
            }
        }
    }

    /// (last seen, session open) for `host`.
    pub fn seen(&self, host: &str) -> (Option<i64>, bool) {
        match self.lock().get(host) {
            Some(e) => (Some(e.last_seen_ms), e.session.is_some()),
            None => (None, false),
        }
    }

    pub fn open_sessions(&self) -> usize {
        self.lock().values().filter(|e| e.session.is_some()).count()
    }
}
