//! Broadcast plumbing on one node: binds the node's broadcast queue to the tags and businesses of its clients,
//! and fans each broadcast out to the sessions that carry a matching tag or business.
//!
//! Broadcasts are at-most-once to the clients connected at that moment: a client whose broadcast queue is full,
//! or that connects a moment later, misses it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;
use tracing::{debug, warn};

use super::Gateway;
use super::registry::PreparedBroadcast;
use crate::broker::BroadcastKey;

/// How many local sessions need each binding.
#[derive(Default)]
pub struct Bindings {
    counts: Mutex<HashMap<BroadcastKey, usize>>,
}

impl Bindings {
    /// Counts the keys of a new session and binds those no other session had.
    pub async fn acquire(&self, gateway: &Gateway, keys: &[BroadcastKey]) {
        let mut counts = self.counts.lock().await;
        for key in keys {
            let count = counts.entry(key.clone()).or_insert(0);
            *count += 1;
            if *count == 1
                && let Err(error) = gateway.broker.bind_broadcast(key.clone()).await
            {
                warn!(?key, %error, "binding the broadcast queue failed; broadcasts with this key will miss this node");
            }
        }
    }

    /// Uncounts the keys of a closed session and unbinds those no session needs any more.
    pub async fn release(&self, gateway: &Gateway, keys: &[BroadcastKey]) {
        let mut counts = self.counts.lock().await;
        for key in keys {
            let Some(count) = counts.get_mut(key) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                counts.remove(key);
                if let Err(error) = gateway.broker.unbind_broadcast(key.clone()).await {
                    debug!(?key, %error, "unbinding the broadcast queue failed");
                }
            }
        }
    }
}

/// Forwards every broadcast that reaches this node to the matching local sessions.
pub fn spawn_fan_out(gateway: &Arc<Gateway>) {
    let gateway_for_task = gateway.clone();
    let mut broadcasts = gateway.broker.broadcasts();
    gateway.tasks.spawn(async move {
        let gateway = gateway_for_task;
        loop {
            let received = tokio::select! {
                _ = gateway.shutdown.cancelled() => break,
                received = broadcasts.recv() => received,
            };
            match received {
                Ok(envelope) => {
                    // Serialized once here, not once per session.
                    let prepared = Arc::new(PreparedBroadcast::new(&envelope));
                    let (reached, skipped) = gateway.registry.fan_out(&envelope, &prepared);
                    debug!(message_id = %envelope.id(), reached, "broadcast fanned out");
                    for identity in skipped {
                        warn!(%identity, message_id = %envelope.id(), "broadcast skipped: the session's broadcast queue is full");
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                    warn!(skipped, "broadcasts were skipped because this node read them too slowly");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
}
