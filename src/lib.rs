//! wsgw: a WebSocket push gateway with reliable messaging over RabbitMQ.
//!
//! The library holds everything the `wsgw` binary does: the domain ([`domain`]), the broker port and its
//! adapters ([`broker`]), the gateway server ([`gateway`]), the client side ([`client`]) and one module per
//! subcommand ([`commands`]).

pub mod broker;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod credentials;
pub mod domain;
pub mod exit;
pub mod gateway;
pub mod http_client;
pub mod metrics;
pub mod output;
pub mod tls;
