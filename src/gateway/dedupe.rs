//! The window of confirmed client messageIds, so a client's resend of a confirmed message is not published
//! twice. It is per node and bounded: the oldest entries leave first, so a resend arriving after
//! `session.dedupe_window` newer confirms (or on another node) is published again.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use crate::domain::Identity;

type Key = (Identity, String);

/// Recently confirmed (sender, messageId) pairs.
pub struct DedupeWindow {
    capacity: usize,
    entries: Mutex<(HashSet<Key>, VecDeque<Key>)>,
}

impl DedupeWindow {
    pub fn new(capacity: usize) -> Self {
        DedupeWindow {
            capacity,
            entries: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    /// True when this sender's messageId was confirmed recently.
    pub fn contains(&self, sender: &Identity, message_id: &str) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.0.contains(&(sender.clone(), message_id.to_owned()))
    }

    /// Records a confirmed messageId, evicting the oldest entry when full.
    pub fn insert(&self, sender: &Identity, message_id: &str) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let key = (sender.clone(), message_id.to_owned());
        if !entries.0.insert(key.clone()) {
            return;
        }
        entries.1.push_back(key);
        while entries.1.len() > self.capacity {
            if let Some(oldest) = entries.1.pop_front() {
                entries.0.remove(&oldest);
            }
        }
    }
}

/// How often each recent messageId was rejected by a client on this node, bounded like [`DedupeWindow`].
///
/// Classic queues on RabbitMQ 3.10 do not count deliveries, so the gateway counts rejections itself. The count
/// is per node and lost on restart; after a crash a poison message may get `session.max_rejects` + 1 more
/// deliveries.
pub struct RejectCounter {
    capacity: usize,
    counts: Mutex<(std::collections::HashMap<String, u32>, VecDeque<String>)>,
}

impl RejectCounter {
    pub fn new(capacity: usize) -> Self {
        RejectCounter {
            capacity: capacity.max(1),
            counts: Mutex::new((std::collections::HashMap::new(), VecDeque::new())),
        }
    }

    /// Counts one more rejection of `message_id` and returns the total.
    pub fn reject(&self, message_id: &str) -> u32 {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *counts;
        let count = map.entry(message_id.to_owned()).or_insert_with(|| {
            order.push_back(message_id.to_owned());
            0
        });
        *count += 1;
        let total = *count;
        while order.len() > self.capacity {
            if let Some(oldest) = order.pop_front() {
                map.remove(&oldest);
            }
        }
        total
    }

    /// Forgets a message that left the mailbox.
    pub fn forget(&self, message_id: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.0.remove(message_id).is_some() {
            counts.1.retain(|id| id != message_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_evicts_oldest() {
        let sender = Identity::new("u", "h5").expect("valid");
        let window = DedupeWindow::new(2);
        window.insert(&sender, "a");
        window.insert(&sender, "b");
        assert!(window.contains(&sender, "a"));
        window.insert(&sender, "c");
        assert!(!window.contains(&sender, "a"));
        assert!(window.contains(&sender, "b"));
        assert!(window.contains(&sender, "c"));
        let other = Identity::new("v", "h5").expect("valid");
        assert!(!window.contains(&other, "b"), "the window is per sender");
    }

    #[test]
    fn reject_counter_counts_and_forgets() {
        let counter = RejectCounter::new(2);
        assert_eq!(counter.reject("m1"), 1);
        assert_eq!(counter.reject("m1"), 2);
        counter.forget("m1");
        assert_eq!(counter.reject("m1"), 1);
        counter.reject("m2");
        counter.reject("m3");
        assert_eq!(counter.reject("m1"), 1, "the oldest entry was evicted");
    }
}
