//! Prometheus metrics, served as text at `/metrics`.
//!
//! Counters labelled by businessType keep at most [`MAX_BUSINESS_TYPES`] distinct values; clients choose
//! businessType, so further values are counted under `other` to bound the number of series.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Distinct businessType label values kept before further ones count as `other`.
pub const MAX_BUSINESS_TYPES: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BusinessLabel {
    pub business_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    pub sessions: Gauge,
    pub connects: Counter,
    pub disconnects: Family<ReasonLabel, Counter>,
    pub published: Family<BusinessLabel, Counter>,
    pub delivered: Family<BusinessLabel, Counter>,
    pub acked: Family<BusinessLabel, Counter>,
    pub redelivered: Family<BusinessLabel, Counter>,
    pub dead_lettered: Family<BusinessLabel, Counter>,
    pub ack_latency: Histogram,
    pub confirm_latency: Histogram,
    pub rabbitmq_connected: Gauge,
    pub rabbitmq_blocked: Gauge,
    business_types: Mutex<HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("wsgw");
        let metrics = Metrics {
            registry: Registry::default(),
            sessions: Gauge::default(),
            connects: Counter::default(),
            disconnects: Family::default(),
            published: Family::default(),
            delivered: Family::default(),
            acked: Family::default(),
            redelivered: Family::default(),
            dead_lettered: Family::default(),
            // 1 ms to about 65 s.
            ack_latency: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            confirm_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            rabbitmq_connected: Gauge::default(),
            rabbitmq_blocked: Gauge::default(),
            business_types: Mutex::new(HashSet::new()),
        };
        registry.register(
            "sessions",
            "Open WebSocket sessions",
            metrics.sessions.clone(),
        );
        registry.register(
            "connects",
            "WebSocket sessions opened",
            metrics.connects.clone(),
        );
        registry.register(
            "disconnects",
            "WebSocket sessions closed, by reason",
            metrics.disconnects.clone(),
        );
        registry.register(
            "messages_published",
            "Messages the gateway published with a broker confirm (client sends and the HTTP API)",
            metrics.published.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages pushed to clients",
            metrics.delivered.clone(),
        );
        registry.register(
            "messages_acked",
            "Mailbox messages acked by clients",
            metrics.acked.clone(),
        );
        registry.register(
            "messages_redelivered",
            "Messages pushed again after an earlier delivery",
            metrics.redelivered.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Messages the gateway moved to the dead-letter queue",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "client_ack_latency_seconds",
            "Time from pushing a mailbox message to the client's ack",
            metrics.ack_latency.clone(),
        );
        registry.register(
            "publish_confirm_latency_seconds",
            "Time from publishing to the broker's confirm",
            metrics.confirm_latency.clone(),
        );
        registry.register(
            "rabbitmq_connected",
            "1 while the broker connections are up",
            metrics.rabbitmq_connected.clone(),
        );
        registry.register(
            "rabbitmq_blocked",
            "1 while RabbitMQ blocks this node's publishers (a memory or disk alarm)",
            metrics.rabbitmq_blocked.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The label for a businessType, or `other` past [`MAX_BUSINESS_TYPES`] distinct values.
    pub fn business(&self, business_type: &str) -> BusinessLabel {
        let mut seen = self
            .business_types
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let known = seen.contains(business_type);
        if !known && seen.len() >= MAX_BUSINESS_TYPES {
            return BusinessLabel {
                business_type: "other".to_owned(),
            };
        }
        if !known {
            seen.insert(business_type.to_owned());
        }
        BusinessLabel {
            business_type: business_type.to_owned(),
        }
    }

    pub fn disconnect(&self, reason: &str) {
        self.disconnects
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn observe_confirm(&self, elapsed: Duration) {
        self.confirm_latency.observe(elapsed.as_secs_f64());
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
