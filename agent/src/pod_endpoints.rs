//! `warden endpoint sync`: the pods of one Kubernetes node as `endpoints_dir` files, from a
//! `PodList` (what `kubectl get pods -A -o json` prints), so that a loop beside the agent keeps
//! the folder equal to the node's pods without Warden talking to the API server itself:
//!
//! ```sh
//! while true; do
//!   kubectl get pods -A --field-selector spec.nodeName="$NODE" -o json \
//!     | warden endpoint sync --node "$NODE" --dir /run/warden/endpoints --dns-target 169.254.20.10:53
//!   sleep 2
//! done
//! ```
//!
//! Each pod scheduled to the node, not finished and not on the host's network becomes
//! `pod-<uid>.yaml`: its name, namespace and labels, its addresses, and its cgroup as the
//! kubelet names it (systemd or cgroupfs driver, by QoS class; a static pod's by its kubelet
//! UID). Host-network pods are left out, as Cilium makes no endpoint of them: they share the
//! node's addresses, and the DNS proxy's own pods are among them. Files of this form whose pod
//! is gone are removed; other files in the folder are left alone. Input that is not a PodList
//! (an API error, an empty output) changes nothing.
//!
//! With `--services` it reads a `ServiceList` instead (`kubectl get services -A -o json`), and
//! makes each Service with a selector and a cluster address `service-<uid>.yaml`: an endpoint
//! only others' rules name (`peer_only`), at its cluster addresses, labelled as the pods it
//! picks. Pods send their DNS to the kube-dns Service, not to a kube-dns pod, and Cilium's
//! `toEndpoints: [{matchLabels: {k8s-app: kube-dns}}]` must reach it (Cilium translates the
//! Service to its pods first; Warden, which does not, takes the Service for them).
//!
//! With `--watch` it reads a stream instead, a list and then a watch's events, and writes each
//! change as it comes rather than every 2 s (a new pod's resolver would otherwise get SERVFAIL
//! for up to that long, and every node would list its pods every 2 s). See [`Watch`]:
//!
//! ```sh
//! while true; do
//!   { kubectl get pods -A --field-selector spec.nodeName="$NODE" -o json &&
//!     kubectl get pods -A --field-selector spec.nodeName="$NODE" -o json --watch --output-watch-events; } \
//!     | warden endpoint sync --watch --node "$NODE" --dir /run/warden/endpoints --dns-target 169.254.20.10:53
//!   sleep 1
//! done
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;
use warden_config::EndpointConfig;

/// How the kubelet names pod cgroups (its `cgroupDriver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// Where the kubelet puts pod cgroups.
#[derive(Debug, Clone)]
pub struct Kubelet {
    pub driver: CgroupDriver,
    /// The kubelet's `--cgroup-root` below the cgroup mount (empty: the mount itself).
    pub cgroup_root: PathBuf,
}

/// What `sync` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub written: usize,
    pub unchanged: usize,
    pub removed: usize,
}

/// The objects of one kind (pods of a node, Services) as a stream tells them: a list (`PodList`:
/// the whole node), an object (a `Pod`, added or changed), or a watch event as
/// `kubectl get --watch --output-watch-events -o json` prints them (`ADDED`, `MODIFIED`,
/// `DELETED`, `BOOKMARK`, `ERROR`). Objects are known by UID.
#[derive(Debug)]
pub struct Watch {
    /// `Pod`, `Service`: the kind of the objects, and of their list (`PodList`).
    kind: &'static str,
    objects: BTreeMap<String, Value>,
    /// A whole list came: only then do the files of objects not known go. (A watch starts
    /// with an `ADDED` event per object, and the others are not gone before theirs comes.)
    listed: bool,
}

/// What one value of the stream did to a [`Watch`].
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Listed,
    Upserted,
    Deleted,
    /// A bookmark, or the deletion of a pod not known.
    Nothing,
}

impl Watch {
    /// A watch of the objects of `kind` (`Pod`, `Service`).
    pub fn of(kind: &'static str) -> Watch {
        Watch {
            kind,
            objects: BTreeMap::new(),
            listed: false,
        }
    }

    /// Takes one value of the stream. An `ERROR` event (the watch ended: a resource version
    /// gone, the API server's error) or a value of no known shape is an error, after which the
    /// caller lists again; what was known stays as it was.
    pub fn apply(&mut self, value: Value) -> anyhow::Result<Change> {
        if let Some(items) = value.get("items").and_then(Value::as_array) {
            // A list of the other kind (Services fed where pods are watched) would remove the
            // files of every object of this one. kubectl names each item's kind (its list is a
            // `List`); the API server's own lists do not.
            for item in items {
                self.of_this_kind(item)?;
            }
            self.objects = items
                .iter()
                .map(|object| (Self::uid(object), object.clone()))
                .collect();
            self.listed = true;
            return Ok(Change::Listed);
        }
        if value.get("kind").and_then(Value::as_str) == Some(self.kind) {
            self.upsert(value);
            return Ok(Change::Upserted);
        }
        let (Some(kind), Some(object)) = (
            value.get("type").and_then(Value::as_str),
            value.get("object"),
        ) else {
            anyhow::bail!(
                "neither a {kind}List, a {kind} nor a watch event",
                kind = self.kind
            );
        };
        match kind {
            "ADDED" | "MODIFIED" => {
                self.of_this_kind(object)?;
                self.upsert(object.clone());
                Ok(Change::Upserted)
            }
            "DELETED" => Ok(match self.objects.remove(&Self::uid(object)) {
                Some(_) => Change::Deleted,
                None => Change::Nothing,
            }),
            "BOOKMARK" => Ok(Change::Nothing),
            "ERROR" => anyhow::bail!(
                "the watch ended: {}",
                object
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("no message")
            ),
            other => anyhow::bail!("a watch event of unknown type {other:?}"),
        }
    }

    /// An error for an object whose `kind` says it is of another kind than the watch's.
    fn of_this_kind(&self, object: &Value) -> anyhow::Result<()> {
        match object.get("kind").and_then(Value::as_str) {
            Some(kind) if kind != self.kind => {
                anyhow::bail!("a {kind} where {}s are watched", self.kind)
            }
            _ => Ok(()),
        }
    }

    /// The objects known, as the list [`endpoints`] and [`services`] read.
    pub fn list(&self) -> Value {
        serde_json::json!({
            "kind": format!("{}List", self.kind),
            "items": self.objects.values().collect::<Vec<_>>(),
        })
    }

    /// Whether a whole list came, so that the files of objects not known may go.
    pub fn complete(&self) -> bool {
        self.listed
    }

    /// An object of the same namespace and name under another UID goes: names are unique at
    /// any one time, so that one was deleted unseen (between the list and the watch's start; a
    /// StatefulSet's pod, replaced), and two endpoints of one name would not load, leaving
    /// every file as it was until the next list.
    fn upsert(&mut self, object: Value) {
        let uid = Self::uid(&object);
        let name = |object: &Value| {
            Some((
                object.pointer("/metadata/namespace")?.as_str()?.to_owned(),
                object.pointer("/metadata/name")?.as_str()?.to_owned(),
            ))
        };
        if let Some(name_of_new) = name(&object) {
            self.objects
                .retain(|known, old| *known == uid || name(old).as_ref() != Some(&name_of_new));
        }
        self.objects.insert(uid, object);
    }

    fn uid(object: &Value) -> String {
        text_at(object, "/metadata/uid")
    }
}

/// The string at `pointer` in `object`, empty when there is none.
fn text_at(object: &Value, pointer: &str) -> String {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// An object's name, namespace and UID (each empty when missing).
fn identity(object: &Value) -> (String, String, String) {
    (
        text_at(object, "/metadata/name"),
        text_at(object, "/metadata/namespace"),
        text_at(object, "/metadata/uid"),
    )
}

/// Prefix of the files `sync` owns for pods.
pub const POD_FILES: &str = "pod-";
/// Prefix of the files `sync` owns for Services.
pub const SERVICE_FILES: &str = "service-";

/// One pod on its way to an endpoint.
struct Candidate {
    uid: String,
    endpoint: EndpointConfig,
    deleting: bool,
    created: String,
}

/// The endpoints of the pods of `pods` (a `PodList`, or one `Pod`) on `node`, by pod UID;
/// `skipped` gets the pods left out and why. Pods that have finished are left out, and so are
/// host-network pods: they share the node's network namespace and addresses, the DNS proxy's
/// own pods among them, whose upstream queries must never be redirected to themselves.
pub fn endpoints(
    pods: &Value,
    node: &str,
    kubelet: &Kubelet,
    dns_target: &[SocketAddr],
    skipped: &mut Vec<String>,
) -> anyhow::Result<BTreeMap<String, EndpointConfig>> {
    // The API server's own lists name no kind in their items (`kubectl get --raw`), but the
    // list does: a ServiceList of those would otherwise pass for a node without pods.
    if let Some(kind) = pods.get("kind").and_then(Value::as_str)
        && !matches!(kind, "PodList" | "List" | "Pod")
    {
        anyhow::bail!("a {kind} where pods are synced: nothing written or removed");
    }
    let items: Vec<&Value> = match pods.get("items").and_then(Value::as_array) {
        Some(items) => items.iter().collect(),
        None if pods.get("kind").and_then(Value::as_str) == Some("Pod") => vec![pods],
        // A Status (an error from the API server), or anything else: not an empty node.
        None => anyhow::bail!("not a PodList: no `items`"),
    };
    // A ServiceList given for pods (`--services` forgotten) holds no pod of the node, and
    // would have removed every pod's file.
    items.iter().try_for_each(|item| of_kind(item, "Pod"))?;
    let mut candidates = Vec::new();
    for pod in items {
        let text = |pointer: &str| text_at(pod, pointer);
        let (name, namespace, uid) = identity(pod);
        if text("/spec/nodeName") != node
            || matches!(text("/status/phase").as_str(), "Succeeded" | "Failed")
            || pod
                .pointer("/spec/hostNetwork")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        {
            continue;
        }
        if name.is_empty() || namespace.is_empty() || !is_plain(&uid) {
            skipped.push(format!(
                "{namespace}/{name}: no name, namespace or plain uid"
            ));
            continue;
        }
        let mut labels = string_map(pod.pointer("/metadata/labels"));
        // Labels Cilium gives every pod, which policies select on (its service-account
        // example among them): without them such a rule selected nothing, and the pod went
        // unenforced.
        let service_account = match text("/spec/serviceAccountName") {
            account if account.is_empty() => "default".to_owned(),
            account => account,
        };
        labels.insert(SERVICE_ACCOUNT_LABEL.to_owned(), service_account);
        labels.insert(CLUSTER_LABEL.to_owned(), CLUSTER_NAME.to_owned());
        let ips = addresses(pod, "/status/podIPs", "ip", "/status/podIP");
        // A static pod's cgroup is named by the kubelet's own UID for it, which its mirror in
        // the API (the object listed here, with a UID of its own) carries as an annotation.
        let mirror = text("/metadata/annotations/kubernetes.io~1config.mirror");
        let cgroup_uid = if is_plain(&mirror) { &mirror } else { &uid };
        let qos = text("/status/qosClass");
        candidates.push(Candidate {
            endpoint: EndpointConfig {
                name,
                namespace,
                labels,
                ips,
                cgroup: Some(pod_cgroup(kubelet, &qos, cgroup_uid)),
                dns_target: dns_target.to_vec(),
                peer_only: false,
            },
            uid,
            deleting: pod.pointer("/metadata/deletionTimestamp").is_some(),
            created: text("/metadata/creationTimestamp"),
        });
    }
    // An address listed for two pods (a terminating pod's, already given to a new one) goes
    // to the pod not being deleted, else the newest; the other keeps its cgroup.
    candidates.sort_by(|a, b| (a.deleting, &b.created).cmp(&(b.deleting, &a.created)));
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for mut candidate in candidates {
        let key = candidate.endpoint.key();
        candidate
            .endpoint
            .ips
            .retain(|ip| match owners.get(&ip.to_canonical()) {
                Some(owner) => {
                    skipped.push(format!("{key}: {ip} is {owner}'s"));
                    false
                }
                None => {
                    owners.insert(ip.to_canonical(), key.clone());
                    true
                }
            });
        endpoints.insert(candidate.uid, candidate.endpoint);
    }
    let all: Vec<EndpointConfig> = endpoints.values().cloned().collect();
    warden_config::validate_endpoints(&all).context("the endpoints would not load")?;
    Ok(endpoints)
}

/// The Services of `services` (a `ServiceList`) that stand for pods, by UID, as endpoints only
/// others' rules name: each with a selector and a cluster address (not headless: a headless
/// Service's name resolves to its pods' own addresses), at its cluster addresses, labelled
/// as its selector (and with the cluster label its pods have). `skipped` gets the rest
/// worth a word.
pub fn services(
    services: &Value,
    skipped: &mut Vec<String>,
) -> anyhow::Result<BTreeMap<String, EndpointConfig>> {
    if let Some(kind) = services.get("kind").and_then(Value::as_str)
        && !matches!(kind, "ServiceList" | "List")
    {
        anyhow::bail!("a {kind} where Services are synced: nothing written or removed");
    }
    let Some(items) = services.get("items").and_then(Value::as_array) else {
        // A Status (an error from the API server), or anything else: not an empty cluster.
        anyhow::bail!("not a ServiceList: no `items`");
    };
    // A PodList given for Services has no selector in it, and would have removed them all.
    items.iter().try_for_each(|item| of_kind(item, "Service"))?;
    let mut endpoints = BTreeMap::new();
    for service in items {
        let (name, namespace, uid) = identity(service);
        if name.is_empty() || namespace.is_empty() || !is_plain(&uid) {
            skipped.push(format!(
                "service {namespace}/{name}: no name, namespace or plain uid"
            ));
            continue;
        }
        let mut labels = string_map(service.pointer("/spec/selector"));
        // Without a selector its endpoints are whatever someone wrote: nothing to stand for.
        if labels.is_empty() {
            continue;
        }
        labels.insert(CLUSTER_LABEL.to_owned(), CLUSTER_NAME.to_owned());
        // "None" (headless) does not parse: left out.
        let ips = addresses(service, "/spec/clusterIPs", "", "/spec/clusterIP");
        if ips.is_empty() {
            continue;
        }
        endpoints.insert(
            uid,
            EndpointConfig {
                // Not a pod's name (no pod's has a colon): the two never clash.
                name: format!("service:{name}"),
                namespace,
                labels,
                ips,
                cgroup: None,
                dns_target: Vec::new(),
                peer_only: true,
            },
        );
    }
    let all: Vec<EndpointConfig> = endpoints.values().cloned().collect();
    warden_config::validate_endpoints(&all).context("the Services would not load")?;
    Ok(endpoints)
}

/// A JSON object of strings (labels, a selector) as a map; what is not a string is left out.
fn string_map(object: Option<&Value>) -> BTreeMap<String, String> {
    object
        .and_then(Value::as_object)
        .map(|object| {
            object
                .iter()
                .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The addresses at `list` (each the string itself, or the string at `field` of each entry)
/// and at `single`, sorted and each once; what does not parse is left out.
fn addresses(object: &Value, list: &str, field: &str, single: &str) -> Vec<IpAddr> {
    let listed = object
        .pointer(list)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let text = if field.is_empty() {
                entry
            } else {
                entry.get(field)?
            };
            text.as_str()?.parse().ok()
        });
    let single = object
        .pointer(single)
        .and_then(Value::as_str)
        .and_then(|ip| ip.parse().ok());
    let mut ips: Vec<IpAddr> = listed.chain(single).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The label Cilium gives a pod for its service account.
const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// The label Cilium gives a pod for its cluster, and the name of Cilium's single cluster.
const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";
const CLUSTER_NAME: &str = "default";

/// An error for a list item whose `kind` is another than `kind` (the API server's own lists
/// name none; kubectl's do).
fn of_kind(item: &Value, kind: &str) -> anyhow::Result<()> {
    match item.get("kind").and_then(Value::as_str) {
        Some(found) if found != kind => {
            anyhow::bail!("a {found} in a list of {kind}s: nothing written or removed")
        }
        _ => Ok(()),
    }
}

/// The first line of every file the sync writes (a YAML comment), by which it knows its own.
const WRITTEN_BY_SYNC: &str =
    "# written by `warden endpoint sync`, which removes it once its object is gone\n";

/// Whether the file `name` in `dir` is one the sync wrote: `prefix`, then [`WRITTEN_BY_SYNC`]
/// at its start, so that a file written by hand in the folder (`pod-b.yaml`) is never taken
/// for one of a pod gone. Files of earlier releases, which had no such line, are known by
/// their name's UID, which the API server makes of hexadecimal digits in dash-separated
/// groups (8-4-4-4-12).
fn written_by_sync(dir: &Path, name: &str, prefix: &str) -> bool {
    let Some(uid) = name
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(".yaml"))
    else {
        return false;
    };
    let api_uid = uid.contains('-')
        && uid
            .split('-')
            .all(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_hexdigit()));
    api_uid || starts_with_marker(&dir.join(name))
}

/// Whether the file at `path` begins with [`WRITTEN_BY_SYNC`] (reading no more than that).
fn starts_with_marker(path: &Path) -> bool {
    use std::io::Read as _;
    let mut start = [0_u8; WRITTEN_BY_SYNC.len()];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut start))
        .is_ok_and(|()| start == WRITTEN_BY_SYNC.as_bytes())
}

/// A UID fit for a file and a cgroup name: letters, digits and dashes.
fn is_plain(uid: &str) -> bool {
    !uid.is_empty() && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The pod's cgroup below the cgroup mount, as the kubelet makes it.
fn pod_cgroup(kubelet: &Kubelet, qos: &str, uid: &str) -> PathBuf {
    let class = match qos {
        "Guaranteed" => None,
        "Burstable" => Some("burstable"),
        // The kubelet's default when it has not said (no requests at all).
        _ => Some("besteffort"),
    };
    match kubelet.driver {
        CgroupDriver::Cgroupfs => {
            let mut path = kubelet.cgroup_root.join("kubepods");
            path.extend(class);
            path.join(format!("pod{uid}"))
        }
        CgroupDriver::Systemd => {
            // The kubelet names a cgroup by parts, its root's first (`custom.slice` is
            // `custom`, `a.slice/a-b.slice` is `a`, `b`), and systemd makes each part a slice
            // inside the one before, named by every part so far: under the root `custom.slice`
            // the pods are in `custom.slice/custom-kubepods.slice/...`, not `kubepods.slice`.
            let root = kubelet
                .cgroup_root
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".slice"))
                .filter(|name| !name.is_empty());
            let pod = format!("pod{}", uid.replace('-', "_"));
            let parts: Vec<&str> = root
                .into_iter()
                .flat_map(|root| root.split('-'))
                .chain(["kubepods"])
                .chain(class)
                .chain([pod.as_str()])
                .collect();
            (1..=parts.len())
                .map(|count| format!("{}.slice", parts[..count].join("-")))
                .collect()
        }
    }
}

/// Makes `dir`'s `<prefix>*.yaml` files ([`POD_FILES`], [`SERVICE_FILES`]) those of
/// `endpoints`: the files of those gone removed first (their addresses may be a new pod's
/// now), then each written (atomically, through a hidden file the agent does not read) only
/// when its text changes. With `prune` false the files of those not in `endpoints` stay (a
/// watch that has not seen a whole list yet).
pub fn sync(
    dir: &Path,
    prefix: &str,
    endpoints: &BTreeMap<String, EndpointConfig>,
    prune: bool,
) -> anyhow::Result<SyncReport> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut report = SyncReport::default();
    let wanted: BTreeSet<String> = endpoints
        .keys()
        .map(|uid| format!("{prefix}{uid}.yaml"))
        .collect();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if prune && !wanted.contains(&name) && written_by_sync(dir, &name, prefix) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            report.removed += 1;
        }
    }
    for (uid, endpoint) in endpoints {
        let file = format!("{prefix}{uid}.yaml");
        let path = dir.join(&file);
        // JSON is YAML: one entry, as the agent reads a list, after the line that marks the
        // file as the sync's.
        let text = format!(
            "{WRITTEN_BY_SYNC}{}\n",
            serde_json::to_string_pretty(&[endpoint])?
        );
        if std::fs::read_to_string(&path).is_ok_and(|current| current == text) {
            report.unchanged += 1;
            continue;
        }
        let staging = dir.join(format!(".{file}.tmp"));
        let written = std::fs::write(&staging, &text)
            .with_context(|| format!("cannot write {}", staging.display()))
            .and_then(|()| {
                std::fs::rename(&staging, &path).with_context(|| {
                    format!("cannot rename {} to {}", staging.display(), path.display())
                })
            });
        if let Err(error) = written {
            let _ = std::fs::remove_file(&staging);
            return Err(error);
        }
        report.written += 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = r#"{
      "kind": "PodList",
      "items": [
        {"metadata": {"name": "web", "namespace": "shop", "uid": "1111-aaaa",
                      "labels": {"app": "web", "tier": "front"}},
         "spec": {"nodeName": "n1", "serviceAccountName": "shop-web"},
         "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "10.244.1.7",
                    "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00:244::7"}]}},
        {"metadata": {"name": "db", "namespace": "shop", "uid": "2222-bbbb"},
         "spec": {"nodeName": "n1"},
         "status": {"phase": "Pending", "qosClass": "Guaranteed"}},
        {"metadata": {"name": "agent", "namespace": "kube-system", "uid": "3333-cccc"},
         "spec": {"nodeName": "n1", "hostNetwork": true},
         "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": "192.168.0.5"}},
        {"metadata": {"name": "done", "namespace": "shop", "uid": "4444-dddd"},
         "spec": {"nodeName": "n1"}, "status": {"phase": "Succeeded"}},
        {"metadata": {"name": "elsewhere", "namespace": "shop", "uid": "5555-eeee"},
         "spec": {"nodeName": "n2"}, "status": {"phase": "Running", "podIP": "10.244.2.9"}},
        {"metadata": {"name": "odd", "namespace": "shop", "uid": "../../etc"},
         "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}},
        {"metadata": {"name": "kube-apiserver-n1", "namespace": "kube-system", "uid": "6666-ffff",
                      "annotations": {"kubernetes.io/config.mirror": "0c0ffee"}},
         "spec": {"nodeName": "n1"},
         "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "10.244.1.8"}},
        {"metadata": {"name": "old", "namespace": "shop", "uid": "7777-0000",
                      "deletionTimestamp": "2026-11-27T10:00:00Z",
                      "creationTimestamp": "2026-11-27T09:00:00Z"},
         "spec": {"nodeName": "n1"},
         "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": "10.244.1.9"}},
        {"metadata": {"name": "new", "namespace": "shop", "uid": "8888-1111",
                      "creationTimestamp": "2026-11-27T10:00:01Z"},
         "spec": {"nodeName": "n1"},
         "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": "10.244.1.9"}}
      ]
    }"#;

    fn target() -> Vec<SocketAddr> {
        vec!["169.254.20.10:53".parse().unwrap()]
    }

    fn kubelet(driver: CgroupDriver) -> Kubelet {
        Kubelet {
            driver,
            cgroup_root: PathBuf::new(),
        }
    }

    fn node_n1(
        driver: CgroupDriver,
        skipped: &mut Vec<String>,
    ) -> BTreeMap<String, EndpointConfig> {
        let pods: Value = serde_json::from_str(PODS).unwrap();
        endpoints(&pods, "n1", &kubelet(driver), &target(), skipped).unwrap()
    }

    #[test]
    fn the_nodes_running_pods_become_endpoints_with_their_cgroups() {
        let mut skipped = Vec::new();
        let found = node_n1(CgroupDriver::Systemd, &mut skipped);
        let mut keys: Vec<String> = found.values().map(EndpointConfig::key).collect();
        keys.sort();
        // Not: another node's pod, a finished one, a host-network one (the DNS proxy's own
        // pods are), one whose uid is not plain.
        assert_eq!(
            keys,
            [
                "kube-system/kube-apiserver-n1",
                "shop/db",
                "shop/new",
                "shop/old",
                "shop/web"
            ]
        );

        let web = &found["1111-aaaa"];
        assert_eq!(web.labels["tier"], "front");
        assert_eq!(web.labels[SERVICE_ACCOUNT_LABEL], "shop-web");
        assert_eq!(web.labels[CLUSTER_LABEL], "default");
        assert_eq!(found["2222-bbbb"].labels[SERVICE_ACCOUNT_LABEL], "default");
        assert_eq!(web.ips.len(), 2);
        assert_eq!(
            web.cgroup.as_deref(),
            Some(Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1111_aaaa.slice"
            ))
        );
        assert_eq!(web.dns_target, target());
        assert_eq!(
            found["2222-bbbb"].cgroup.as_deref(),
            Some(Path::new("kubepods.slice/kubepods-pod2222_bbbb.slice"))
        );
        // A static pod's cgroup is its kubelet UID's, not its mirror's.
        assert_eq!(
            found["6666-ffff"].cgroup.as_deref(),
            Some(Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0c0ffee.slice"
            ))
        );
        // An address listed twice goes to the pod not being deleted; the other keeps its
        // cgroup.
        assert_eq!(found["8888-1111"].ips.len(), 1);
        assert!(found["7777-0000"].ips.is_empty());
        assert!(found["7777-0000"].cgroup.is_some());
        assert_eq!(skipped.len(), 2, "{skipped:?}");

        let cgroupfs = node_n1(CgroupDriver::Cgroupfs, &mut Vec::new());
        assert_eq!(
            cgroupfs["8888-1111"].cgroup.as_deref(),
            Some(Path::new("kubepods/besteffort/pod8888-1111"))
        );
        let rooted = endpoints(
            &serde_json::from_str(PODS).unwrap(),
            "n1",
            &Kubelet {
                driver: CgroupDriver::Cgroupfs,
                cgroup_root: PathBuf::from("kubelet"),
            },
            &[],
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(
            rooted["2222-bbbb"].cgroup.as_deref(),
            Some(Path::new("kubelet/kubepods/pod2222-bbbb"))
        );
    }

    /// Under a systemd kubelet's own `--cgroup-root` the pods were looked for in a
    /// `kubepods.slice` that exists only at the top: never enrolled, their egress unpoliced.
    #[test]
    fn a_systemd_cgroup_root_names_every_slice_below_it() {
        let at = |root: &str, qos: &str| {
            let kubelet = Kubelet {
                driver: CgroupDriver::Systemd,
                cgroup_root: PathBuf::from(root),
            };
            pod_cgroup(&kubelet, qos, "1234-abcd")
        };
        assert_eq!(
            at("", "Burstable"),
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice"
            )
        );
        assert_eq!(
            at("custom.slice", "Burstable"),
            Path::new(
                "custom.slice/custom-kubepods.slice/custom-kubepods-burstable.slice/\
                 custom-kubepods-burstable-pod1234_abcd.slice"
            )
        );
        assert_eq!(
            at("a.slice/a-b.slice", "Guaranteed"),
            Path::new("a.slice/a-b.slice/a-b-kubepods.slice/a-b-kubepods-pod1234_abcd.slice")
        );
    }

    #[test]
    fn what_is_not_a_pod_list_is_an_error_not_an_empty_node() {
        let kubelet = kubelet(CgroupDriver::Systemd);
        for text in ["{}", "null", r#"{"kind": "Status", "status": "Failure"}"#] {
            let value: Value = serde_json::from_str(text).unwrap();
            assert!(
                endpoints(&value, "n1", &kubelet, &[], &mut Vec::new()).is_err(),
                "{text}"
            );
        }
        let two_v4 = [
            "10.0.0.1:53".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap(),
        ];
        let pods: Value = serde_json::from_str(PODS).unwrap();
        assert!(endpoints(&pods, "n1", &kubelet, &two_v4, &mut Vec::new()).is_err());
    }

    #[test]
    fn sync_writes_what_changed_and_removes_only_its_own_files_of_gone_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("static.yaml"), "- {name: keep}").unwrap();
        let found = node_n1(CgroupDriver::Systemd, &mut Vec::new());
        let first = sync(dir.path(), POD_FILES, &found, true).unwrap();
        assert_eq!((first.written, first.unchanged, first.removed), (5, 0, 0));
        // What the agent reads back is what was meant.
        let text = std::fs::read_to_string(dir.path().join("pod-1111-aaaa.yaml")).unwrap();
        let read = warden_config::endpoints_from_yaml(&text, Path::new("pod")).unwrap();
        warden_config::validate_endpoints(&read).unwrap();
        assert_eq!(read, [found["1111-aaaa"].clone()]);

        let again = sync(dir.path(), POD_FILES, &found, true).unwrap();
        assert_eq!((again.written, again.unchanged, again.removed), (0, 5, 0));

        let mut fewer = found.clone();
        fewer.remove("2222-bbbb");
        let after = sync(dir.path(), POD_FILES, &fewer, true).unwrap();
        assert_eq!((after.written, after.unchanged, after.removed), (0, 4, 1));
        assert!(!dir.path().join("pod-2222-bbbb.yaml").exists());
        assert!(dir.path().join("static.yaml").exists());
    }

    /// The Services that stand for pods become endpoints only others' rules name, labelled as
    /// the pods they pick, in files of their own beside the pods' that neither sync removes.
    #[test]
    fn services_with_a_selector_and_a_cluster_address_stand_for_their_pods() {
        let list = serde_json::json!({
            "kind": "ServiceList",
            "items": [
                {"metadata": {"name": "kube-dns", "namespace": "kube-system", "uid": "aaaa-1111"},
                 "spec": {"selector": {"k8s-app": "kube-dns"}, "clusterIP": "10.96.0.10",
                          "clusterIPs": ["10.96.0.10", "fd00:96::a"]}},
                {"metadata": {"name": "db", "namespace": "shop", "uid": "bbbb-2222"},
                 "spec": {"selector": {"app": "db"}, "clusterIP": "None"}},
                {"metadata": {"name": "external", "namespace": "shop", "uid": "cccc-3333"},
                 "spec": {"clusterIP": "10.96.0.20"}},
                {"metadata": {"name": "odd", "namespace": "shop", "uid": "../x"},
                 "spec": {"selector": {"app": "x"}, "clusterIP": "10.96.0.30"}}
            ]
        });
        let mut skipped = Vec::new();
        let found = services(&list, &mut skipped).unwrap();
        assert_eq!(
            found.keys().collect::<Vec<_>>(),
            ["aaaa-1111"],
            "{skipped:?}"
        );
        assert_eq!(skipped.len(), 1, "the odd uid is said: {skipped:?}");
        let dns = &found["aaaa-1111"];
        assert_eq!(dns.key(), "kube-system/service:kube-dns");
        assert!(dns.peer_only);
        assert_eq!(dns.labels["k8s-app"], "kube-dns");
        assert_eq!(dns.ips.len(), 2);
        assert!(services(&serde_json::json!({"kind": "Status"}), &mut skipped).is_err());

        // Files of their own: the pods' sync leaves them, and theirs leaves the pods'.
        let dir = tempfile::tempdir().unwrap();
        let pods = node_n1(CgroupDriver::Systemd, &mut Vec::new());
        sync(dir.path(), POD_FILES, &pods, true).unwrap();
        let written = sync(dir.path(), SERVICE_FILES, &found, true).unwrap();
        assert_eq!((written.written, written.removed), (1, 0));
        let again = sync(dir.path(), POD_FILES, &pods, true).unwrap();
        assert_eq!(again.removed, 0);
        let text = std::fs::read_to_string(dir.path().join("service-aaaa-1111.yaml")).unwrap();
        let read = warden_config::endpoints_from_yaml(&text, Path::new("service")).unwrap();
        assert_eq!(read, std::slice::from_ref(dns));
        let gone = sync(dir.path(), SERVICE_FILES, &BTreeMap::new(), true).unwrap();
        assert_eq!(gone.removed, 1);
        assert!(dir.path().join("pod-1111-aaaa.yaml").exists());

        // Watched as pods are: a list, then events.
        let mut watch = Watch::of("Service");
        let kube_dns = list["items"][0].clone();
        assert_eq!(
            watch
                .apply(serde_json::json!({"kind": "ServiceList", "items": []}))
                .unwrap(),
            Change::Listed
        );
        assert_eq!(
            watch
                .apply(serde_json::json!({"type": "ADDED", "object": kube_dns}))
                .unwrap(),
            Change::Upserted
        );
        let found = services(&watch.list(), &mut Vec::new()).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), ["aaaa-1111"]);
        assert!(
            watch
                .apply(serde_json::json!({"kind": "Pod", "metadata": {"uid": "x"}}))
                .is_err(),
            "a Pod in a Service stream"
        );
        // Nor in a list or an event: a PodList fed to the Service sync removed every
        // Service's file, and the other way round every pod's.
        let pods = serde_json::json!({"kind": "List", "items": [
            {"kind": "Pod", "metadata": {"uid": "p"}}]});
        let error = watch.apply(pods).unwrap_err();
        assert!(
            error.to_string().contains("a Pod where Services"),
            "{error}"
        );
        assert!(
            watch
                .apply(serde_json::json!({"type": "ADDED", "object": {"kind": "Pod"}}))
                .is_err()
        );
        let known = services(&watch.list(), &mut Vec::new()).unwrap();
        assert_eq!(known.len(), 1, "what was known stays");
    }

    fn pod(uid: &str, ip: &str) -> Value {
        serde_json::json!({
            "kind": "Pod",
            "metadata": {"name": format!("p{uid}"), "namespace": "shop", "uid": uid},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": ip}
        })
    }

    fn event(kind: &str, object: Value) -> Value {
        serde_json::json!({"type": kind, "object": object})
    }

    fn uids(watch: &Watch) -> Vec<String> {
        let found = endpoints(
            &watch.list(),
            "n1",
            &kubelet(CgroupDriver::Systemd),
            &target(),
            &mut Vec::new(),
        )
        .unwrap();
        found.into_keys().collect()
    }

    #[test]
    fn a_watch_keeps_the_pods_a_list_and_its_events_tell() {
        let mut watch = Watch::of("Pod");
        // Events before a list: known, but the node's other pods are not gone.
        assert_eq!(
            watch.apply(event("ADDED", pod("a", "10.0.0.1"))).unwrap(),
            Change::Upserted
        );
        assert!(!watch.complete());
        let list = serde_json::json!({"kind": "PodList", "items": [pod("b", "10.0.0.2")]});
        assert_eq!(watch.apply(list).unwrap(), Change::Listed);
        assert!(watch.complete());
        assert_eq!(uids(&watch), ["b"], "a list is the whole node");
        watch.apply(event("ADDED", pod("c", "10.0.0.3"))).unwrap();
        watch.apply(pod("d", "10.0.0.4")).unwrap();
        // A new address for b: one pod, changed.
        watch
            .apply(event("MODIFIED", pod("b", "10.0.0.9")))
            .unwrap();
        assert_eq!(uids(&watch), ["b", "c", "d"]);
        let b = &endpoints(
            &watch.list(),
            "n1",
            &kubelet(CgroupDriver::Systemd),
            &target(),
            &mut Vec::new(),
        )
        .unwrap()["b"];
        assert_eq!(b.ips, ["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            watch.apply(event("DELETED", pod("c", "10.0.0.3"))).unwrap(),
            Change::Deleted
        );
        assert_eq!(
            watch
                .apply(event("DELETED", pod("zz", "10.0.0.7")))
                .unwrap(),
            Change::Nothing
        );
        assert_eq!(
            watch
                .apply(event("BOOKMARK", serde_json::json!({"kind": "Pod"})))
                .unwrap(),
            Change::Nothing
        );
        assert_eq!(uids(&watch), ["b", "d"]);
        // The watch's end, and what is no event: errors, and nothing known is lost.
        let gone = event(
            "ERROR",
            serde_json::json!({"kind": "Status", "message": "too old resource version"}),
        );
        let error = watch.apply(gone).unwrap_err().to_string();
        assert!(error.contains("too old resource version"), "{error}");
        for odd in [
            serde_json::json!({"type": "SHRUGGED", "object": {}}),
            serde_json::json!({"kind": "Status", "status": "Failure"}),
            serde_json::json!(null),
        ] {
            assert!(watch.apply(odd.clone()).is_err(), "{odd}");
        }
        assert_eq!(uids(&watch), ["b", "d"]);
    }

    /// A StatefulSet's pod deleted between the list and the watch's start, then made again:
    /// two endpoints of one name failed to load, and nothing was written until the next list.
    #[test]
    fn a_pod_of_a_known_name_under_another_uid_replaces_it() {
        let mut watch = Watch::of("Pod");
        let list = serde_json::json!({"kind": "PodList", "items": [pod("a", "10.0.0.1")]});
        watch.apply(list).unwrap();
        let mut again = pod("b", "10.0.0.2");
        again["metadata"]["name"] = "pa".into();
        watch.apply(event("ADDED", again)).unwrap();
        assert_eq!(uids(&watch), ["b"]);
    }

    /// A ServiceList fed to the pods' sync (`--services` forgotten) is a node without pods,
    /// and removed every pod's file; a PodList fed to the Services' removed every Service's.
    #[test]
    fn a_list_of_the_other_kind_is_an_error() {
        let pods_of_n1 = |list: &Value| {
            endpoints(
                list,
                "n1",
                &kubelet(CgroupDriver::Systemd),
                &target(),
                &mut Vec::new(),
            )
        };
        let fails_saying = |result: anyhow::Result<BTreeMap<String, EndpointConfig>>,
                            says: &str| {
            let error = result.unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        };
        let service_list = serde_json::json!({"kind": "List", "items": [
            {"kind": "Service", "metadata": {"name": "s", "namespace": "a", "uid": "aaaa-1111"},
             "spec": {"selector": {"app": "x"}, "clusterIP": "10.96.0.20"}}]});
        fails_saying(pods_of_n1(&service_list), "a Service in a list of Pods");
        let pods: Value = serde_json::from_str(PODS).unwrap();
        // kubectl's own lists are `List`s whose items name their kind.
        let mut kubectl_pods = pods.clone();
        kubectl_pods["kind"] = "List".into();
        for item in kubectl_pods["items"].as_array_mut().unwrap() {
            item["kind"] = "Pod".into();
        }
        fails_saying(
            services(&kubectl_pods, &mut Vec::new()),
            "a Pod in a list of Services",
        );
        // The API server's own lists name no kind in their items, only the list does.
        let raw_services = serde_json::json!({"kind": "ServiceList", "items": [
            {"metadata": {"name": "s", "namespace": "a", "uid": "aaaa-1111"}}]});
        fails_saying(pods_of_n1(&raw_services), "a ServiceList where pods");
        fails_saying(services(&pods, &mut Vec::new()), "a PodList where Services");
        // kubectl names each item's kind; the API server's own lists do not.
        assert_eq!(
            pods_of_n1(&kubectl_pods).unwrap().len(),
            node_n1(CgroupDriver::Systemd, &mut Vec::new()).len()
        );
    }

    /// The docs' own example of a file written by hand, `pod-b.yaml`, went at the next sync.
    #[test]
    fn files_written_by_hand_are_never_pruned() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "pod-b.yaml",
            "pod-web.yaml",
            "pod-.yaml",
            "service-dns.yaml",
        ] {
            std::fs::write(dir.path().join(name), "- {name: keep}").unwrap();
        }
        std::fs::write(
            dir.path()
                .join("pod-9f0c6a1e-0b7d-4c1a-9e55-3f2b1c0d4e5f.yaml"),
            "[]",
        )
        .unwrap();
        let pruned = sync(dir.path(), POD_FILES, &BTreeMap::new(), true).unwrap();
        assert_eq!(pruned.removed, 1);
        let pruned = sync(dir.path(), SERVICE_FILES, &BTreeMap::new(), true).unwrap();
        assert_eq!(pruned.removed, 0);
        for name in [
            "pod-b.yaml",
            "pod-web.yaml",
            "pod-.yaml",
            "service-dns.yaml",
        ] {
            assert!(dir.path().join(name).exists(), "{name}");
        }
        // What the sync wrote itself is its own, whatever its UID's shape (`pod-b` too), and
        // goes once its pod is gone; a file written by hand under that name would stay.
        let endpoint = node_n1(CgroupDriver::Systemd, &mut Vec::new())
            .into_values()
            .next()
            .unwrap();
        std::fs::remove_file(dir.path().join("pod-b.yaml")).unwrap();
        let one = BTreeMap::from([("b".to_owned(), endpoint)]);
        sync(dir.path(), POD_FILES, &one, true).unwrap();
        let text = std::fs::read_to_string(dir.path().join("pod-b.yaml")).unwrap();
        assert!(text.starts_with(WRITTEN_BY_SYNC), "{text}");
        let pruned = sync(dir.path(), POD_FILES, &BTreeMap::new(), true).unwrap();
        assert_eq!(pruned.removed, 1);
        assert!(!dir.path().join("pod-b.yaml").exists());
    }

    #[test]
    fn a_sync_without_prune_keeps_the_files_of_pods_not_known() {
        let dir = tempfile::tempdir().unwrap();
        let found = node_n1(CgroupDriver::Systemd, &mut Vec::new());
        sync(dir.path(), POD_FILES, &found, true).unwrap();
        let mut one = found.clone();
        one.retain(|uid, _| uid == "1111-aaaa");
        let kept = sync(dir.path(), POD_FILES, &one, false).unwrap();
        assert_eq!((kept.written, kept.unchanged, kept.removed), (0, 1, 0));
        assert!(dir.path().join("pod-2222-bbbb.yaml").exists());
        let pruned = sync(dir.path(), POD_FILES, &one, true).unwrap();
        assert_eq!(pruned.removed, 4);
    }
}
