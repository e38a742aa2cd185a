//! Admission of new sessions: the Origin allow-list, the client address behind trusted proxies, and the caps on
//! sessions in total and per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

/// One entry of `server.allowed_origins`: `https://pay.example.com`, `http://localhost:3000`, or a wildcard
/// subdomain `https://*.example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// The host, lower case; for a wildcard, the suffix after `*.`.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl OriginPattern {
    /// Parses an allow-list entry; the error describes what a valid entry looks like.
    pub fn parse(text: &str) -> Result<OriginPattern, String> {
        let usage = "give an origin as scheme://host[:port], such as https://pay.example.com or https://*.example.com";
        let (wildcard, parsable) = match text.split_once("://*.") {
            Some((scheme, rest)) => (true, format!("{scheme}://{rest}")),
            None => (false, text.to_owned()),
        };
        let url = url::Url::parse(&parsable).map_err(|error| format!("{error}; {usage}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("the scheme must be http or https; {usage}"));
        }
        if url.path() != "/" || url.query().is_some() || parsable.trim_end_matches('/') != parsable
        {
            return Err(format!("an origin has no path; {usage}"));
        }
        let Some(host) = url.host_str() else {
            return Err(format!("the origin has no host; {usage}"));
        };
        Ok(OriginPattern {
            scheme: url.scheme().to_owned(),
            host: host.to_ascii_lowercase(),
            wildcard,
            port: url.port(),
        })
    }

    /// True when the `Origin` header value `origin` matches this entry.
    pub fn matches(&self, origin: &str) -> bool {
        let Ok(url) = url::Url::parse(origin) else {
            return false;
        };
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let host_matches = if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|prefix| prefix.ends_with('.') && prefix.len() > 1)
        } else {
            host == self.host
        };
        url.scheme() == self.scheme && host_matches && url.port() == self.port
    }
}

/// The origin allow-list; empty allows every origin.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    patterns: Vec<OriginPattern>,
}

impl Origins {
    /// Builds the list from config entries, which [`crate::config::Config::problems`] has already checked.
    pub fn new(entries: &[String]) -> Origins {
        Origins {
            patterns: entries
                .iter()
                .filter_map(|entry| OriginPattern::parse(entry).ok())
                .collect(),
        }
    }

    /// True when a request with this `Origin` header may proceed. Requests without one come from programs, not
    /// browsers, and are allowed: the check protects browser users from foreign pages.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(origin) => {
                self.patterns.is_empty()
                    || self.patterns.iter().any(|pattern| pattern.matches(origin))
            }
        }
    }

    /// True when the list is empty, so every origin is allowed.
    pub fn is_open(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// Parses a `server.trusted_proxies` entry: an address or a network in CIDR notation.
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    if let Ok(network) = text.parse::<IpNet>() {
        return Ok(network);
    }
    text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        "give an IP address such as 10.0.0.5 or a network such as 10.0.0.0/8".to_owned()
    })
}

/// Reverse proxies whose `X-Forwarded-For` header is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
}

impl TrustedProxies {
    /// Builds the list from config entries, which [`crate::config::Config::problems`] has already checked.
    pub fn new(entries: &[String]) -> TrustedProxies {
        TrustedProxies {
            networks: entries
                .iter()
                .filter_map(|entry| parse_network(entry).ok())
                .collect(),
        }
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.networks
            .iter()
            .any(|network| network.contains(&address))
    }

    /// The client's address: the peer, unless the peer is a trusted proxy, in which case the nearest address in
    /// `X-Forwarded-For` that is not itself a trusted proxy. Entries a client wrote itself sit further left and
    /// are never reached, so a client cannot choose its own address.
    pub fn client_address<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a str>,
    ) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        // Each proxy appends the address it received from, so the nearest hop is the last entry.
        let entries: Vec<&str> = forwarded_for.flat_map(|value| value.split(',')).collect();
        let mut client = peer;
        for entry in entries.into_iter().rev() {
            let Ok(address) = entry.trim().parse::<IpAddr>() else {
                // A malformed entry ends the chain: what lies beyond it cannot be attributed.
                return client;
            };
            client = address;
            if !self.trusts(address) {
                return address;
            }
        }
        client
    }
}

/// Why a session was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("this node has reached server.max_sessions ({0}); retry later or on another node")]
    NodeFull(usize),
    #[error(
        "too many sessions from this address (server.max_sessions_per_address is {0}); close one first"
    )]
    AddressFull(usize),
}

/// Counts open sessions, in total and per client address.
#[derive(Debug)]
pub struct SessionLimits {
    max_sessions: usize,
    max_per_address: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// One admitted session; dropping it frees its place.
#[derive(Debug)]
pub struct Admission {
    limits: Arc<SessionLimits>,
    address: IpAddr,
}

impl SessionLimits {
    pub fn new(max_sessions: usize, max_per_address: usize) -> Arc<SessionLimits> {
        Arc::new(SessionLimits {
            max_sessions,
            max_per_address,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Takes a place for a session from `address`, or returns which cap is reached.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Admission, AdmissionError> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.max_sessions {
            return Err(AdmissionError::NodeFull(self.max_sessions));
        }
        let from_address = counts.per_address.get(&address).copied().unwrap_or(0);
        if self.max_per_address > 0 && from_address >= self.max_per_address {
            return Err(AdmissionError::AddressFull(self.max_per_address));
        }
        counts.total += 1;
        counts.per_address.insert(address, from_address + 1);
        Ok(Admission {
            limits: self.clone(),
            address,
        })
    }

    /// Sessions admitted and not yet dropped.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(count) = counts.per_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.per_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let origins = Origins::new(&[
            "https://pay.example.com".to_owned(),
            "https://*.shop.example".to_owned(),
            "http://localhost:3000".to_owned(),
        ]);
        assert!(origins.allows(Some("https://pay.example.com")));
        assert!(origins.allows(Some("https://PAY.example.com")));
        assert!(origins.allows(Some("https://a.shop.example")));
        assert!(origins.allows(Some("http://localhost:3000")));
        assert!(origins.allows(None));
        assert!(!origins.allows(Some("http://pay.example.com")));
        assert!(!origins.allows(Some("https://pay.example.com.evil.example")));
        assert!(!origins.allows(Some("https://shop.example")));
        assert!(!origins.allows(Some("https://evilshop.example")));
        assert!(!origins.allows(Some("http://localhost:3001")));
        assert!(!origins.allows(Some("null")));
        assert!(Origins::new(&[]).allows(Some("https://anything.example")));
    }

    #[test]
    fn origin_entries_with_paths_or_other_schemes_are_rejected() {
        assert!(OriginPattern::parse("https://pay.example.com/").is_err());
        assert!(OriginPattern::parse("https://pay.example.com/app").is_err());
        assert!(OriginPattern::parse("ftp://pay.example.com").is_err());
        assert!(OriginPattern::parse("pay.example.com").is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = TrustedProxies::new(&["10.0.0.0/8".to_owned(), "192.0.2.1".to_owned()]);
        let client: IpAddr = "203.0.113.9".parse().expect("address");
        let proxy: IpAddr = "10.1.2.3".parse().expect("address");
        let stranger: IpAddr = "198.51.100.4".parse().expect("address");
        // Through one trusted proxy.
        assert_eq!(
            proxies.client_address(proxy, ["203.0.113.9"].into_iter()),
            client
        );
        // A client that wrote its own header: the proxy appended the real address, which wins.
        assert_eq!(
            proxies.client_address(proxy, ["1.2.3.4, 203.0.113.9"].into_iter()),
            client
        );
        // Two proxies, over two header lines.
        assert_eq!(
            proxies.client_address(proxy, ["203.0.113.9", "192.0.2.1"].into_iter()),
            client
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(
            proxies.client_address(stranger, ["203.0.113.9"].into_iter()),
            stranger
        );
        // Garbage ends the chain at the last trusted hop.
        assert_eq!(
            proxies.client_address(proxy, ["not-an-address"].into_iter()),
            proxy
        );
    }

    #[test]
    fn limits_cap_total_and_per_address_and_free_on_drop() {
        let limits = SessionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.10".parse().expect("address");
        let b: IpAddr = "192.0.2.11".parse().expect("address");
        let first = limits.admit(a).expect("first");
        let _second = limits.admit(a).expect("second");
        assert_eq!(limits.admit(a).err(), Some(AdmissionError::AddressFull(2)));
        let _third = limits.admit(b).expect("other address");
        assert_eq!(limits.admit(b).err(), Some(AdmissionError::NodeFull(3)));
        drop(first);
        assert_eq!(limits.open(), 2);
        assert!(limits.admit(a).is_ok());
    }
}
