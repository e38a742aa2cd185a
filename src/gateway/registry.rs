//! The sessions live on this node, one per identity.
//!
//! Registering a session closes the older session of the same identity with the replaced code. Across nodes,
//! a takeover announcement closes a local session only when the announced session is newer: session ids are
//! UUIDv7, so they order by connect time, and a late announcement of an older session never closes a newer one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::broker::SessionView;
use crate::domain::envelope::unix_millis;

use crate::domain::frame::close_code;
use crate::domain::{Envelope, Identity};

/// An instruction to a running session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// Close the WebSocket with this code and reason.
    Close { code: u16, reason: String },
}

/// What the registry keeps about a live session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session_id: String,
    pub identity: Identity,
    pub remote: SocketAddr,
    pub connected_at: SystemTime,
    /// Tags and businesses from the token; broadcasts carrying any of them reach this session.
    pub tags: Vec<String>,
    pub businesses: Vec<String>,
    /// Nonce of the token the session connected with, to recognise the same token used on another node.
    pub token_nonce: String,
}

impl SessionInfo {
    /// True when a broadcast envelope carries any of this session's tags or businesses.
    pub fn wants(&self, envelope: &Envelope) -> bool {
        envelope.tags.iter().any(|tag| self.tags.contains(tag))
            || envelope
                .businesses
                .iter()
                .any(|business| self.businesses.contains(business))
    }
}

/// A broadcast serialized once for all the sessions it goes to.
#[derive(Debug)]
pub struct PreparedBroadcast {
    pub message_id: String,
    pub business_type: String,
    /// The whole `message` frame as JSON text.
    pub frame: tokio_tungstenite::tungstenite::Utf8Bytes,
}

impl PreparedBroadcast {
    pub fn new(envelope: &Envelope) -> PreparedBroadcast {
        let frame = crate::domain::ServerFrame::Message {
            redelivered: false,
            replay_count: 0,
            message: envelope.clone(),
        };
        PreparedBroadcast {
            message_id: envelope.id().to_owned(),
            business_type: envelope.business_type.clone(),
            frame: frame.to_json().into(),
        }
    }
}

/// Counters a session updates as it works.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub pushed: AtomicU64,
    pub acked: AtomicU64,
    pub pending: AtomicU64,
}

struct Entry {
    info: SessionInfo,
    stats: Arc<SessionStats>,
    commands: Arc<CommandSlot>,
    inbox: mpsc::Sender<SessionMessage>,
}

/// What a session's inbox carries. One channel for both keeps a session's memory small: a tokio channel
/// allocates its state and a block of slots up front.
#[derive(Debug)]
pub enum SessionMessage {
    /// A broadcast to push; dropped when the inbox is full (broadcasts are at-most-once).
    Broadcast(Arc<PreparedBroadcast>),
    /// The answer to one of the client's sends, once the broker confirmed or refused it.
    Outcome(Box<crate::domain::ServerFrame>),
}

/// The pending command of one session, set by other tasks and taken by the session. Only the first command
/// counts: every command closes the session.
#[derive(Debug, Default)]
pub struct CommandSlot {
    command: Mutex<Option<SessionCommand>>,
    notify: tokio::sync::Notify,
}

impl CommandSlot {
    /// Sets the command unless one is already pending. Returns false when one was.
    pub fn send(&self, command: SessionCommand) -> bool {
        let mut slot = self.command.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(command);
        self.notify.notify_one();
        true
    }

    /// Takes the pending command, if any.
    pub fn try_take(&self) -> Option<SessionCommand> {
        self.command
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Waits for a command.
    pub async fn recv(&self) -> SessionCommand {
        loop {
            if let Some(command) = self.try_take() {
                return command;
            }
            self.notify.notified().await;
        }
    }
}

/// The live sessions of this node, by identity.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<Identity, Entry>>,
}

impl Registry {
    /// Registers a session and closes the older session of the same identity, if any. Returns the session's
    /// command slot, its inbox (with a sender for the session's own send outcomes) of `inbox_capacity` entries,
    /// and its counters.
    pub fn register(
        &self,
        info: SessionInfo,
        inbox_capacity: usize,
    ) -> (
        Arc<CommandSlot>,
        mpsc::Receiver<SessionMessage>,
        mpsc::Sender<SessionMessage>,
        Arc<SessionStats>,
    ) {
        let commands = Arc::new(CommandSlot::default());
        let stats = Arc::new(SessionStats::default());
        let (inbox, inbox_receiver) = mpsc::channel(inbox_capacity.max(1));
        let identity = info.identity.clone();
        let previous = self.lock().insert(
            identity,
            Entry {
                info,
                stats: stats.clone(),
                commands: commands.clone(),
                inbox: inbox.clone(),
            },
        );
        if let Some(previous) = previous {
            send_replaced(&previous.commands);
        }
        (commands, inbox_receiver, inbox, stats)
    }

    /// Closes the session with this id with the kicked code. Returns false when no such session is here.
    pub fn kick(&self, session_id: &str) -> bool {
        let sessions = self.lock();
        let Some(entry) = sessions
            .values()
            .find(|entry| entry.info.session_id == session_id)
        else {
            return false;
        };
        // A pending command means the session is already closing.
        entry.commands.send(SessionCommand::Close {
            code: close_code::KICKED,
            reason: "closed by an operator; reconnect later".to_owned(),
        })
    }

    /// The live sessions as `wsgw sessions` shows them.
    pub fn views(&self, node: &str) -> Vec<SessionView> {
        self.lock()
            .values()
            .map(|entry| SessionView {
                session_id: entry.info.session_id.clone(),
                unique_id: entry.info.identity.unique_id.clone(),
                client_type: entry.info.identity.client_type.clone(),
                node: node.to_owned(),
                remote: entry.info.remote.to_string(),
                connected_at: unix_millis(entry.info.connected_at),
                pushed: entry.stats.pushed.load(Ordering::Relaxed),
                acked: entry.stats.acked.load(Ordering::Relaxed),
                pending: entry.stats.pending.load(Ordering::Relaxed),
                tags: entry.info.tags.clone(),
                businesses: entry.info.businesses.clone(),
            })
            .collect()
    }

    /// Queues a broadcast for every session that wants it. Returns how many sessions got it and the
    /// identities whose queue was full (they miss it: broadcasts are at-most-once).
    pub fn fan_out(
        &self,
        envelope: &Envelope,
        prepared: &Arc<PreparedBroadcast>,
    ) -> (usize, Vec<Identity>) {
        let sessions = self.lock();
        let mut reached = 0;
        let mut skipped = Vec::new();
        for entry in sessions.values().filter(|entry| entry.info.wants(envelope)) {
            match entry
                .inbox
                .try_send(SessionMessage::Broadcast(prepared.clone()))
            {
                Ok(()) => reached += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    skipped.push(entry.info.identity.clone())
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        (reached, skipped)
    }

    /// Removes the session unless a newer session of the same identity already took its place.
    pub fn unregister(&self, identity: &Identity, session_id: &str) {
        let mut sessions = self.lock();
        if sessions
            .get(identity)
            .is_some_and(|entry| entry.info.session_id == session_id)
        {
            sessions.remove(identity);
        }
    }

    /// Applies another session's announcement to the local session of `identity`, if there is one.
    ///
    /// A newer session with a fresh token replaces an older one. Two sessions with the same token nonce mean the
    /// token was used twice, on two nodes at nearly the same moment. Then the older session keeps the identity and
    /// the newer one is closed, whichever node it is on, so a reused token never takes over a live session.
    /// Session ids are UUIDv7, so every node orders the two sessions the same way.
    pub fn apply_takeover(
        &self,
        identity: &Identity,
        session_id: &str,
        token_nonce: Option<&str>,
    ) -> Takeover {
        let mut sessions = self.lock();
        let Some(entry) = sessions.get(identity) else {
            return Takeover::NoLocalSession;
        };
        let local_id = entry.info.session_id.as_str();
        if local_id == session_id {
            return Takeover::NoLocalSession;
        }
        let same_token = token_nonce == Some(entry.info.token_nonce.as_str());
        match (same_token, local_id < session_id) {
            (true, true) => Takeover::KeptAgainstReuse {
                local_session_id: local_id.to_owned(),
            },
            (true, false) => {
                if let Some(entry) = sessions.remove(identity) {
                    entry.commands.send(SessionCommand::Close {
                        code: close_code::POLICY_VIOLATION,
                        reason: "this connection used a token that another connection already used; request \
                                 a new token for each connection"
                            .to_owned(),
                    });
                }
                Takeover::ClosedReuse
            }
            (false, true) => {
                if let Some(entry) = sessions.remove(identity) {
                    send_replaced(&entry.commands);
                }
                Takeover::Replaced
            }
            (false, false) => Takeover::NoLocalSession,
        }
    }

    /// Snapshot of the live sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.lock()
            .values()
            .map(|entry| entry.info.clone())
            .collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What an announcement of another session did to the local one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// No older local session of that identity.
    NoLocalSession,
    /// The older local session was closed with the replaced code.
    Replaced,
    /// The announced session reused the local session's token; the local session, being older, stays.
    KeptAgainstReuse { local_session_id: String },
    /// The local session reused the announced session's token and was newer, so it was closed.
    ClosedReuse,
}

fn send_replaced(commands: &CommandSlot) {
    // A pending command means the session is already closing.
    commands.send(SessionCommand::Close {
        code: close_code::REPLACED,
        reason: "replaced by a newer connection of the same identity".to_owned(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(session_id: &str) -> SessionInfo {
        SessionInfo {
            session_id: session_id.to_owned(),
            identity: Identity::new("u1", "h5").expect("valid"),
            remote: SocketAddr::from(([127, 0, 0, 1], 1)),
            connected_at: SystemTime::now(),
            tags: vec!["vip".to_owned()],
            businesses: Vec::new(),
            token_nonce: "nonce".to_owned(),
        }
    }

    #[test]
    fn register_replaces_older_session() {
        let registry = Registry::default();
        let (first, _, _, _) = registry.register(info("a"), 4);
        let _second = registry.register(info("b"), 4);
        let command = first.try_take().expect("replaced command");
        assert!(matches!(
            command,
            SessionCommand::Close {
                code: close_code::REPLACED,
                ..
            }
        ));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn late_announcement_of_older_session_is_ignored() {
        let registry = Registry::default();
        let (current, _, _, _) = registry.register(info("b"), 4);
        let identity = info("a").identity;
        assert_eq!(
            registry.apply_takeover(&identity, "a", Some("other-nonce")),
            Takeover::NoLocalSession
        );
        assert!(current.try_take().is_none());
        assert_eq!(
            registry.apply_takeover(&identity, "c", Some("other-nonce")),
            Takeover::Replaced
        );
        assert!(current.try_take().is_some());
    }

    #[test]
    fn reused_token_never_takes_over_and_the_newer_session_closes() {
        let identity = info("a").identity;
        // The local session is the original: an announcement of a later session with its token changes nothing.
        let registry = Registry::default();
        let (original, _, _, _) = registry.register(info("b"), 4);
        assert_eq!(
            registry.apply_takeover(&identity, "c", Some("nonce")),
            Takeover::KeptAgainstReuse {
                local_session_id: "b".to_owned()
            }
        );
        assert!(original.try_take().is_none());
        assert_eq!(registry.len(), 1);
        // The local session is the reuse: hearing of the earlier session with the same token closes it.
        let registry = Registry::default();
        let (reuse, _, _, _) = registry.register(info("c"), 4);
        assert_eq!(
            registry.apply_takeover(&identity, "b", Some("nonce")),
            Takeover::ClosedReuse
        );
        assert!(matches!(
            reuse.try_take(),
            Some(SessionCommand::Close {
                code: close_code::POLICY_VIOLATION,
                ..
            })
        ));
        assert!(registry.is_empty());
    }

    #[test]
    fn unregister_keeps_newer_session() {
        let registry = Registry::default();
        let _first = registry.register(info("a"), 4);
        let _second = registry.register(info("b"), 4);
        registry.unregister(&info("a").identity, "a");
        assert_eq!(registry.len(), 1);
        registry.unregister(&info("b").identity, "b");
        assert!(registry.is_empty());
    }
}
