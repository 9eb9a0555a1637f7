//! The agent's admin HTTP API: `/healthz`, `/readyz`, `/v1/status`, `/metrics`,
//! `/v1/fqdn/cache`, `POST /v1/fqdn/cache/clean`, `/v1/endpoints` and `/v1/flows`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use warden_proxy::{PolicySource, SharedCache, unix_now};
use warden_telemetry::{CacheFilter, FlowLog, InstanceStatus, Metrics, PolicyStatusView};

use crate::api::{CacheChanges, Sessions};
use crate::policy_store::{PolicyStatus, PolicyStore};

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub policy: Arc<PolicyStore>,
    pub cache: SharedCache,
    pub serving: Arc<AtomicBool>,
    pub dns_listen: Vec<SocketAddr>,
    pub started: Instant,
    /// Tells the cache persister that `/v1/fqdn/cache/clean` changed the cache.
    pub cache_changes: Arc<CacheChanges>,
    /// Passes each clean on to the dnsproxy sessions, whose caches hold the same entries.
    pub cleans: crate::api::CleanFanout,
    /// The connected dnsproxy sessions.
    pub sessions: Arc<Sessions>,
    /// The eBPF datapath, if on: who it steers the DNS port's queries to.
    pub datapath: Option<warden_datapath::Datapath>,
}

/// One row of `GET /v1/endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    pub id: u32,
    /// `namespace/name`.
    pub endpoint: String,
    /// `source:key=value`, as policies select them.
    pub labels: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// As configured (relative paths are under `datapath.cgroup_root`).
    pub cgroup: Option<PathBuf>,
    /// Whether a policy with egress rules selects the endpoint (default deny for egress).
    pub enforced: bool,
    /// Only a peer of others' rules (a Service synced as one): never enforced, never a sender.
    #[serde(default)]
    pub peer_only: bool,
}

/// What `POST /v1/fqdn/cache/clean` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanReport {
    /// (endpoint, name) pairs removed.
    pub names: usize,
    /// (endpoint, name, IP) entries removed.
    pub ips: usize,
    pub removed: Vec<CleanedEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanedEntry {
    pub endpoint: String,
    pub name: String,
    pub ip: IpAddr,
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

pub fn router(state: AdminState, metrics: Metrics, flows: Arc<FlowLog>) -> Router {
    let api = Router::new()
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/v1/fqdn/cache", get(cache))
        .route("/v1/fqdn/cache/clean", post(clean_cache))
        .route("/v1/endpoints", get(endpoints))
        .with_state(state);
    warden_telemetry::admin::common_routes(metrics, flows).merge(api)
}

impl AdminState {
    pub fn status(&self) -> InstanceStatus {
        let policy = self.policy.status();
        let serving = self.serving.load(Ordering::Relaxed);
        let sessions = self.sessions.snapshot();
        let (cache_names, cache_ips) = {
            let cache = self.cache.lock();
            (cache.name_count(), cache.ip_count())
        };
        InstanceStatus {
            instance: "agent".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            serving,
            ready: serving && policy.revision > 0,
            peer_connected: !sessions.is_empty(),
            mode: "online".to_owned(),
            policy_revision: policy.revision,
            policy: policy.into(),
            cache_names,
            cache_ips,
            endpoints: self.policy.endpoints().infos().len(),
            dns_listen: self.dns_listen.clone(),
            dns_port_holders: serving
                .then(|| "agent".to_owned())
                .into_iter()
                .chain(
                    sessions
                        .iter()
                        .filter(|session| session.serving)
                        .map(|session| session.instance.clone()),
                )
                .collect(),
            datapath: if self.datapath.is_some() {
                "ebpf"
            } else {
                "none"
            }
            .to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            preferred: self
                .datapath
                .as_ref()
                .and_then(warden_enforce::serving::preferred_name),
            last_resync_at_ms: sessions.iter().filter_map(|s| s.last_resync_at_ms).max(),
            last_resync_ms: sessions
                .iter()
                .max_by_key(|s| s.last_resync_at_ms)
                .and_then(|s| s.last_resync_ms),
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

/// `GET /v1/fqdn/cache[?endpoint=ns/name][&name=PATTERN]`.
async fn cache(State(state): State<AdminState>, Query(filter): Query<CacheFilter>) -> Response {
    filter
        .listing(unix_now(), |now, filter| {
            state
                .cache
                .entries_sorted(now, move |endpoint, name| filter.matches(endpoint, name))
        })
        .await
}

/// `POST /v1/fqdn/cache/clean[?endpoint=ns/name][&name=PATTERN]`: removes the matching
/// (endpoint, name) pairs, expired or not, and says what went. Their datapath entries are
/// revoked by the reconciler, which no longer finds them wanted.
async fn clean_cache(
    State(state): State<AdminState>,
    Query(filter): Query<CacheFilter>,
) -> Response {
    let pattern = filter.name.clone();
    let compiled = match filter.compile() {
        Ok(compiled) => compiled,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    // Remembered first: what a proxy sends from now on of what was answered before is
    // dropped, so nothing comes back between the clean here and the proxy's. Cleaned by the
    // proxy's rule, what was answered before: an answer of this agent's since stays, as it
    // does on the proxy, and goes to it after the clean.
    let clean = state.cleans.record(filter, compiled.clone(), &state.cache);
    let cleaned = state
        .cache
        .clean_learned_before(clean.made_at_ms(), move |endpoint, name| {
            compiled.matches(endpoint, name)
        })
        .await;
    // Also when nothing went here, or the clean failed part way: the proxy's cache may hold
    // what this one never saw (and would hand it back at the next resync), and whatever went
    // here must be saved.
    state.cleans.send(&clean);
    state.cleans.save().await;
    let removed = match cleaned {
        Ok(removed) => removed,
        Err(message) => {
            state.cache_changes.0.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = message.trim_end(), "cache clean failed");
            return (StatusCode::INTERNAL_SERVER_ERROR, "cache clean failed\n").into_response();
        }
    };
    if !removed.is_empty() {
        state.cache_changes.0.fetch_add(1, Ordering::Relaxed);
    }
    let mut pairs: Vec<(&str, &str)> = removed
        .iter()
        .map(|gone| (gone.endpoint.as_str(), gone.name.as_str()))
        .collect();
    pairs.dedup();
    let report = CleanReport {
        names: pairs.len(),
        ips: removed.len(),
        removed: removed
            .iter()
            .map(|gone| CleanedEntry {
                endpoint: gone.endpoint.clone(),
                name: gone.name.clone(),
                ip: gone.ip,
            })
            .collect(),
    };
    tracing::info!(
        names = report.names,
        ips = report.ips,
        pattern = pattern.as_deref().unwrap_or("*"),
        "FQDN cache cleaned"
    );
    Json(report).into_response()
}

/// `GET /v1/endpoints`: every endpoint with its labels, IPs, cgroup and whether the policy in
/// force enforces its egress.
async fn endpoints(State(state): State<AdminState>) -> Json<Vec<EndpointRow>> {
    let policy = state.policy.current();
    let rows = state
        .policy
        .endpoints()
        .entries()
        .map(|(info, key, config)| EndpointRow {
            id: info.id.0,
            endpoint: key.to_string(),
            labels: info.labels.iter().map(ToString::to_string).collect(),
            ips: info.ips.clone(),
            cgroup: config.cgroup.clone(),
            enforced: policy.is_enforced(info.id),
            peer_only: config.peer_only,
        })
        .collect();
    Json(rows)
}
