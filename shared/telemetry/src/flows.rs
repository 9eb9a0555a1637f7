use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// What happened to a DNS query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Forwarded upstream and answered.
    Allowed,
    /// Refused by policy.
    Denied,
    /// Allowed, but no usable answer (timeout, upstream error, overload): SERVFAIL.
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Error => "error",
        }
    }
}

/// One DNS query as the proxy handled it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsFlow {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub instance: String,
    /// `namespace/name`, or `reserved:unknown` for a client that is no known endpoint.
    pub endpoint: String,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub protocol: String,
    pub qname: String,
    pub qtype: String,
    pub rcode: String,
    pub verdict: Verdict,
    pub ips: Vec<IpAddr>,
    pub ttl: u32,
    pub cnames: Vec<String>,
    pub latency_us: u64,
}

/// One packet the datapath dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DropFlow {
    pub time_ms: u64,
    pub instance: String,
    pub endpoint: String,
    pub destination: IpAddr,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FlowEvent {
    Dns(DnsFlow),
    Drop(DropFlow),
}

/// The last `capacity` flow events, plus a live feed for followers. Recording never blocks and
/// never waits for a slow follower: a follower that falls behind loses events, not the proxy.
#[derive(Debug)]
pub struct FlowLog {
    recent: Mutex<VecDeque<FlowEvent>>,
    capacity: usize,
    live: broadcast::Sender<FlowEvent>,
}

impl FlowLog {
    pub fn new(capacity: usize) -> FlowLog {
        let (live, _) = broadcast::channel(1024);
        FlowLog {
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            live,
        }
    }

    pub fn record(&self, event: FlowEvent) {
        if self.live.receiver_count() > 0 {
            // An error only means no follower is listening any more.
            let _ = self.live.send(event.clone());
        }
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(event);
    }

    /// The retained events, oldest first.
    pub fn recent(&self) -> Vec<FlowEvent> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        recent.iter().cloned().collect()
    }

    pub fn follow(&self) -> broadcast::Receiver<FlowEvent> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_event(port: u16) -> FlowEvent {
        FlowEvent::Drop(DropFlow {
            time_ms: 1,
            instance: "agent".into(),
            endpoint: "youssef/test".into(),
            destination: "198.18.1.30".parse().unwrap(),
            port,
            protocol: "tcp".into(),
        })
    }

    #[test]
    fn the_ring_keeps_the_newest_events() {
        let log = FlowLog::new(2);
        for port in 1..=3 {
            log.record(drop_event(port));
        }
        assert_eq!(log.recent(), vec![drop_event(2), drop_event(3)]);
    }

    #[tokio::test]
    async fn followers_see_events_recorded_after_they_subscribe() {
        let log = FlowLog::new(4);
        log.record(drop_event(1));
        let mut follower = log.follow();
        log.record(drop_event(2));
        assert_eq!(follower.recv().await.unwrap(), drop_event(2));
    }

    #[test]
    fn events_serialize_with_a_type_tag() {
        let json = serde_json::to_string(&drop_event(80)).unwrap();
        assert!(json.starts_with(r#"{"type":"drop""#), "{json}");
    }
}
