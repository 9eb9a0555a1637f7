//! The agent's admin HTTP API: `/healthz`, `/readyz`, `/v1/status`, `/metrics`,
//! `/v1/fqdn/cache` and `/v1/flows`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Deserialize;
use warden_fqdn::Source;
use warden_proxy::{SharedCache, unix_now};
use warden_telemetry::{CacheRow, CacheRowIp, FlowLog, InstanceStatus, Metrics, PolicyStatusView};

use crate::policy_store::{PolicyStatus, PolicyStore};

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub policy: Arc<PolicyStore>,
    pub cache: SharedCache,
    pub serving: Arc<AtomicBool>,
    pub dns_listen: Vec<SocketAddr>,
    pub endpoints: usize,
    pub datapath: String,
    pub started: Instant,
}

impl From<PolicyStatus> for PolicyStatusView {
    fn from(status: PolicyStatus) -> Self {
        PolicyStatusView {
            revision: status.revision,
            policies: status.policies,
            selectors: status.selectors,
            source: status.source,
            last_error: status.last_error,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct CacheFilter {
    endpoint: Option<String>,
    name: Option<String>,
}

pub fn router(state: AdminState, metrics: Metrics, flows: Arc<FlowLog>) -> Router {
    let api = Router::new()
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/fqdn/cache", get(cache))
        .with_state(state);
    warden_telemetry::admin::common_routes(metrics, flows).merge(api)
}

impl AdminState {
    pub fn status(&self) -> InstanceStatus {
        let policy = self.policy.status();
        let serving = self.serving.load(Ordering::Relaxed);
        let (cache_names, cache_ips) = {
            let cache = self.cache.lock();
            (cache.name_count(), cache.ip_count())
        };
        InstanceStatus {
            instance: "agent".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            serving,
            ready: serving && policy.revision > 0,
            peer_connected: false,
            mode: "online".to_owned(),
            policy_revision: policy.revision,
            policy: policy.into(),
            cache_names,
            cache_ips,
            endpoints: self.endpoints,
            dns_listen: self.dns_listen.clone(),
            dns_port_holders: if serving {
                vec!["agent".to_owned()]
            } else {
                Vec::new()
            },
            datapath: self.datapath.clone(),
            uptime_s: self.started.elapsed().as_secs(),
        }
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let status = state.status();
    if status.ready {
        (StatusCode::OK, "ready\n".to_owned())
    } else if !status.serving {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not serving DNS\n".to_owned(),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no policy loaded\n".to_owned(),
        )
    }
}

async fn status(State(state): State<AdminState>) -> Json<InstanceStatus> {
    Json(state.status())
}

async fn cache(
    State(state): State<AdminState>,
    Query(filter): Query<CacheFilter>,
) -> Json<Vec<CacheRow>> {
    let now = unix_now();
    let entries = state.cache.lock().entries(now);
    let wanted_name = filter
        .name
        .as_deref()
        .map(|name| name.trim_end_matches('.').to_ascii_lowercase());
    let rows = entries
        .into_iter()
        .filter(|entry| {
            filter
                .endpoint
                .as_deref()
                .is_none_or(|e| e == entry.endpoint)
        })
        .filter(|entry| {
            wanted_name
                .as_deref()
                .is_none_or(|name| entry.name.trim_end_matches('.') == name)
        })
        .map(|entry| {
            let entries: Vec<CacheRowIp> = entry
                .ips
                .iter()
                .map(|cached| CacheRowIp {
                    ip: cached.ip,
                    ttl: cached.expires_at.0.saturating_sub(now.0),
                    expires_at: cached.expires_at.0,
                    source: source_name(cached.source).to_owned(),
                })
                .collect();
            let expires_at = entries.iter().map(|ip| ip.expires_at).max().unwrap_or(0);
            let source = if entry.ips.iter().any(|ip| ip.source == Source::Lookup) {
                Source::Lookup
            } else {
                entry.ips.first().map_or(Source::Lookup, |ip| ip.source)
            };
            CacheRow {
                endpoint: entry.endpoint,
                name: entry.name,
                ips: entries.iter().map(|ip| ip.ip).collect(),
                ttl: expires_at.saturating_sub(now.0),
                expires_at,
                source: source_name(source).to_owned(),
                entries,
            }
        })
        .collect();
    Json(rows)
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Lookup => "lookup",
        Source::Connection => "connection",
        Source::Restored => "restored",
    }
}
