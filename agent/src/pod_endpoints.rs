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
//! Each pod scheduled to the node and not finished becomes `pod-<uid>.yaml`: its name,
//! namespace and labels, its addresses (none for a host-network pod, whose addresses are the
//! node's), and its cgroup as the kubelet names it (systemd or cgroupfs driver, by QoS class).
//! Files of this form whose pod is gone are removed; other files in the folder are left alone.

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

/// What `sync` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub written: usize,
    pub unchanged: usize,
    pub removed: usize,
    /// Pods of the node left out, with why.
    pub skipped: Vec<String>,
}

/// Prefix of the files `sync` owns.
const PREFIX: &str = "pod-";

/// The endpoints of the pods of `pods` (a `PodList` or a single `Pod`) on `node`, by pod UID.
pub fn endpoints(
    pods: &Value,
    node: &str,
    driver: CgroupDriver,
    dns_target: &[SocketAddr],
    skipped: &mut Vec<String>,
) -> BTreeMap<String, EndpointConfig> {
    let items: Vec<&Value> = match pods.get("items").and_then(Value::as_array) {
        Some(items) => items.iter().collect(),
        None if pods.get("kind").and_then(Value::as_str) == Some("Pod") => vec![pods],
        None => Vec::new(),
    };
    let mut endpoints = BTreeMap::new();
    for pod in items {
        let text = |path: &[&str]| {
            path.iter()
                .try_fold(pod, |value, key| value.get(key))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (name, namespace, uid) = (
            text(&["metadata", "name"]),
            text(&["metadata", "namespace"]),
            text(&["metadata", "uid"]),
        );
        if text(&["spec", "nodeName"]) != node {
            continue;
        }
        let phase = text(&["status", "phase"]);
        if matches!(phase.as_str(), "Succeeded" | "Failed") {
            continue;
        }
        let uid_is_plain =
            !uid.is_empty() && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if name.is_empty() || namespace.is_empty() || !uid_is_plain {
            skipped.push(format!(
                "{namespace}/{name}: no name, namespace or plain uid"
            ));
            continue;
        }
        let labels: BTreeMap<String, String> = pod
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|labels| {
                labels
                    .iter()
                    .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let host_network = pod
            .pointer("/spec/hostNetwork")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        // A host-network pod's addresses are the node's: another endpoint's to claim.
        let ips: Vec<IpAddr> = if host_network {
            Vec::new()
        } else {
            let listed = pod
                .pointer("/status/podIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|entry| entry.get("ip")?.as_str()?.parse().ok());
            let single = pod
                .pointer("/status/podIP")
                .and_then(Value::as_str)
                .and_then(|ip| ip.parse().ok());
            let mut ips: Vec<IpAddr> = listed.chain(single).collect();
            ips.sort();
            ips.dedup();
            ips
        };
        let qos = text(&["status", "qosClass"]);
        endpoints.insert(
            uid.clone(),
            EndpointConfig {
                name,
                namespace,
                labels,
                ips,
                cgroup: Some(pod_cgroup(driver, &qos, &uid)),
                // Pods in their own network namespace reach the proxy at the target; host-
                // network ones at dns.listen, as the host does.
                dns_target: if host_network {
                    Vec::new()
                } else {
                    dns_target.to_vec()
                },
            },
        );
    }
    endpoints
}

/// The pod's cgroup relative to the cgroup root, as the kubelet makes it.
fn pod_cgroup(driver: CgroupDriver, qos: &str, uid: &str) -> PathBuf {
    let class = match qos {
        "Guaranteed" => None,
        "Burstable" => Some("burstable"),
        // The kubelet's default when it has not said (no requests at all).
        _ => Some("besteffort"),
    };
    match (driver, class) {
        (CgroupDriver::Systemd, None) => PathBuf::from(format!(
            "kubepods.slice/kubepods-pod{}.slice",
            uid.replace('-', "_")
        )),
        (CgroupDriver::Systemd, Some(class)) => PathBuf::from(format!(
            "kubepods.slice/kubepods-{class}.slice/kubepods-{class}-pod{}.slice",
            uid.replace('-', "_")
        )),
        (CgroupDriver::Cgroupfs, None) => PathBuf::from(format!("kubepods/pod{uid}")),
        (CgroupDriver::Cgroupfs, Some(class)) => {
            PathBuf::from(format!("kubepods/{class}/pod{uid}"))
        }
    }
}

/// Makes `dir`'s `pod-*.yaml` files those of `endpoints`: each written (atomically, through a
/// hidden file the agent does not read) only when its text changes, the others removed.
pub fn sync(
    dir: &Path,
    endpoints: &BTreeMap<String, EndpointConfig>,
) -> anyhow::Result<SyncReport> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut report = SyncReport::default();
    let mut wanted = BTreeSet::new();
    for (uid, endpoint) in endpoints {
        let file = format!("{PREFIX}{uid}.yaml");
        let path = dir.join(&file);
        // JSON is YAML: one entry, as the agent reads a list.
        let text = serde_json::to_string_pretty(&[endpoint])? + "\n";
        wanted.insert(file.clone());
        if std::fs::read_to_string(&path).is_ok_and(|current| current == text) {
            report.unchanged += 1;
            continue;
        }
        let staging = dir.join(format!(".{file}.tmp"));
        std::fs::write(&staging, &text)
            .with_context(|| format!("cannot write {}", staging.display()))?;
        std::fs::rename(&staging, &path).with_context(|| {
            format!("cannot rename {} to {}", staging.display(), path.display())
        })?;
        report.written += 1;
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && name.ends_with(".yaml") && !wanted.contains(&name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            report.removed += 1;
        }
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
         "spec": {"nodeName": "n1"},
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
         "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}
      ]
    }"#;

    fn target() -> Vec<SocketAddr> {
        vec!["169.254.20.10:53".parse().unwrap()]
    }

    #[test]
    fn the_nodes_running_pods_become_endpoints_with_their_cgroups() {
        let pods: Value = serde_json::from_str(PODS).unwrap();
        let mut skipped = Vec::new();
        let found = endpoints(&pods, "n1", CgroupDriver::Systemd, &target(), &mut skipped);
        let keys: Vec<String> = found.values().map(EndpointConfig::key).collect();
        assert_eq!(keys, ["shop/web", "shop/db", "kube-system/agent"]);
        assert_eq!(skipped.len(), 1, "{skipped:?}");

        let web = &found["1111-aaaa"];
        assert_eq!(web.labels["tier"], "front");
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
        // The node's addresses are not the host-network pod's to claim; its DNS goes where
        // the host's does.
        let agent = &found["3333-cccc"];
        assert!(agent.ips.is_empty() && agent.dns_target.is_empty());

        let cgroupfs = endpoints(&pods, "n1", CgroupDriver::Cgroupfs, &[], &mut Vec::new());
        assert_eq!(
            cgroupfs["3333-cccc"].cgroup.as_deref(),
            Some(Path::new("kubepods/besteffort/pod3333-cccc"))
        );
    }

    #[test]
    fn sync_writes_what_changed_and_removes_only_its_own_files_of_gone_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("static.yaml"), "- {name: keep}").unwrap();
        let pods: Value = serde_json::from_str(PODS).unwrap();
        let found = endpoints(
            &pods,
            "n1",
            CgroupDriver::Systemd,
            &target(),
            &mut Vec::new(),
        );
        let first = sync(dir.path(), &found).unwrap();
        assert_eq!((first.written, first.unchanged, first.removed), (3, 0, 0));
        // What the agent reads back is what was meant.
        let text = std::fs::read_to_string(dir.path().join("pod-1111-aaaa.yaml")).unwrap();
        let read = warden_config::endpoints_from_yaml(&text, Path::new("pod")).unwrap();
        warden_config::validate_endpoints(&read).unwrap();
        assert_eq!(read, [found["1111-aaaa"].clone()]);

        let again = sync(dir.path(), &found).unwrap();
        assert_eq!((again.written, again.unchanged, again.removed), (0, 3, 0));

        let mut fewer = found.clone();
        fewer.remove("2222-bbbb");
        let after = sync(dir.path(), &fewer).unwrap();
        assert_eq!((after.written, after.unchanged, after.removed), (0, 2, 1));
        assert!(!dir.path().join("pod-2222-bbbb.yaml").exists());
        assert!(dir.path().join("static.yaml").exists());
    }
}
