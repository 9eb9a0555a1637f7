#!/usr/bin/env python3
"""Helpers of scripts/check-observability.sh: the parts that read JSON and YAML.

Subcommands (each exits non-zero with one line per problem):
  dashboards OUT_RULES OUT_NAMES   every panel query of dashboards/*.json as a recording rule (for
                                   `promtool check rules`), and the warden_* names they use
  rule-names OUT_NAMES FILE...     the warden_* names the expressions of rule files use
  configs WORK UPSTREAM AGENT_ADMIN PROXY_ADMIN
                                   parses deploy/ and dashboards/provisioning YAML; writes the lab
                                   configs of the live check (the ConfigMaps' configs with lab
                                   addresses), the ConfigMaps' policies, and a copy of
                                   prometheus.yml that Debian's promtool can check
  check-names SCRAPE NAMES...      every name is a metric family of the scrape
  check-docs SCRAPE DOC            the metric table of DOC lists exactly the scrape's families
  free-port                        a TCP port free on 127.0.0.1 now
  json-get FILE KEY...             a value out of a JSON document (keys or list indexes)
"""

import glob
import json
import os
import re
import random
import socket
import sys

NAME = re.compile(r"\bwarden_[a-zA-Z0-9_]+\b")
# Grafana's variables, replaced by values that keep the query valid PromQL.
GRAFANA_VARIABLES = [
    ("$__rate_interval", "1m"),
    ("$__interval", "1m"),
    ("$__range", "1h"),
    ("${node}", ".*"),
    ("$node", ".*"),
]


def fail(problems):
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    sys.exit(1)


def load_yaml_documents(path):
    try:
        import yaml
    except ImportError:
        fail(["python3-yaml is missing (apt-get install python3-yaml)"])
    with open(path, encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def dump_yaml(value, path):
    import yaml

    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(value, handle, sort_keys=False)


def panels_of(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboards(out_rules, out_names):
    problems, rules, names = [], [], set()
    files = sorted(glob.glob("dashboards/*.json"))
    if not files:
        problems.append("no dashboards in dashboards/")
    uids = set()
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                board = json.load(handle)
        except (OSError, ValueError) as error:
            problems.append(f"{path}: not JSON: {error}")
            continue
        for key in ("uid", "title", "panels", "schemaVersion"):
            if key not in board:
                problems.append(f"{path}: no {key}")
        if board.get("uid") in uids:
            problems.append(f"{path}: uid {board.get('uid')} used twice")
        uids.add(board.get("uid"))
        for variable in board.get("templating", {}).get("list", []):
            query = variable.get("query")
            if isinstance(query, dict):
                query = query.get("query", "")
            names.update(NAME.findall(query or ""))
        ids = set()
        for panel in panels_of(board):
            where = f"{path}: panel {panel.get('id')} ({panel.get('title')!r})"
            if panel.get("id") in ids:
                problems.append(f"{where}: id used twice")
            ids.add(panel.get("id"))
            if "gridPos" not in panel:
                problems.append(f"{where}: no gridPos")
            if panel.get("type") == "row":
                continue
            targets = panel.get("targets") or []
            if not targets:
                problems.append(f"{where}: no query")
            for target in targets:
                expr = target.get("expr", "")
                if not expr.strip():
                    problems.append(f"{where}: target {target.get('refId')} has no expr")
                    continue
                for variable, value in GRAFANA_VARIABLES:
                    expr = expr.replace(variable, value)
                if "$" in expr:
                    problems.append(f"{where}: unknown Grafana variable in {expr!r}")
                names.update(NAME.findall(expr))
                record = f"dashboard:{os.path.basename(path)[:-5].replace('-', '_')}:panel{panel.get('id')}_{target.get('refId')}"
                rules.append({"record": record, "expr": expr})
    if problems:
        fail(problems)
    with open(out_rules, "w", encoding="utf-8") as handle:
        # JSON is YAML, and keeps this free of a YAML writer.
        json.dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, handle, indent=1)
    with open(out_names, "w", encoding="utf-8") as handle:
        handle.write("".join(f"{name}\n" for name in sorted(names)))
    print(f"{len(files)} dashboards, {len(rules)} panel queries, {len(names)} metric names")


def rule_names(out_names, files):
    names = set()
    for path in files:
        for document in load_yaml_documents(path):
            for group in document.get("groups", []):
                for rule in group.get("rules", []):
                    names.update(NAME.findall(str(rule.get("expr", ""))))
    with open(out_names, "w", encoding="utf-8") as handle:
        handle.write("".join(f"{name}\n" for name in sorted(names)))
    print(f"{len(files)} rule files, {len(names)} metric names")


def configs(work, upstream, agent_admin, proxy_admin):
    problems = []
    for path in sorted(glob.glob("dashboards/provisioning/*.yaml")):
        documents = load_yaml_documents(path)
        if not documents or documents[0].get("apiVersion") != 1:
            problems.append(f"{path}: not a Grafana provisioning file (apiVersion: 1)")
    manifests = {}
    for path in sorted(glob.glob("deploy/kubernetes/*.yaml")):
        for document in load_yaml_documents(path):
            for key in ("apiVersion", "kind", "metadata"):
                if key not in document:
                    problems.append(f"{path}: a document without {key}")
            manifests.setdefault(document.get("kind"), []).append((path, document))
    daemonsets = {doc["metadata"]["name"]: doc for _, doc in manifests.get("DaemonSet", [])}
    for name, port in (("warden-agent", "9890"), ("warden-dnsproxy", "9891")):
        daemonset = daemonsets.get(name)
        if daemonset is None:
            problems.append(f"deploy/kubernetes: no DaemonSet {name}")
            continue
        template = daemonset["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != port:
            problems.append(f"DaemonSet {name}: no prometheus.io scrape annotations for port {port}")
        if not template["spec"].get("hostNetwork"):
            problems.append(f"DaemonSet {name}: not hostNetwork")
        paths = {volume.get("hostPath", {}).get("path") for volume in template["spec"].get("volumes", [])}
        for wanted in ("/run/warden", "/sys/fs/bpf"):
            if wanted not in paths:
                problems.append(f"DaemonSet {name}: no hostPath volume {wanted}")
    maps = {doc["metadata"]["name"]: doc for _, doc in manifests.get("ConfigMap", [])}
    import yaml

    def config_of(name):
        try:
            return yaml.safe_load(maps[name]["data"]["config.yaml"])
        except (KeyError, yaml.YAMLError) as error:
            problems.append(f"ConfigMap {name}: no readable config.yaml ({error})")
            return None

    agent = config_of("warden-agent-config")
    proxy = config_of("warden-dnsproxy-config")
    policies = maps.get("warden-policies", {}).get("data", {})
    if not policies:
        problems.append("ConfigMap warden-policies: no policy")
    if problems:
        fail(problems)

    os.makedirs(f"{work}/configmap-policies", exist_ok=True)
    for file, text in policies.items():
        with open(f"{work}/configmap-policies/{file}", "w", encoding="utf-8") as handle:
            handle.write(text)
    upstream_port = upstream.rsplit(":", 1)[1]
    os.makedirs(f"{work}/policies", exist_ok=True)
    with open(f"{work}/policies/lab.yaml", "w", encoding="utf-8") as handle:
        handle.write(LAB_POLICY.format(port=upstream_port))
    # The ConfigMaps' configs as they are, with only what ties them to a node replaced: so the
    # live check also proves that the processes accept the deployed configs.
    agent["dns"].update(listen=["127.0.0.1:0"], upstream=upstream, upstream_timeout_ms=500)
    agent["policy"] = {"dir": f"{work}/policies"}
    agent["state_dir"] = f"{work}/agent-state"
    agent["socket"] = f"{work}/agent.sock"
    agent["admin"] = {"listen": agent_admin}
    agent["datapath"] = {"mode": "none", "bpffs": f"{work}/bpffs"}
    agent["endpoints"] = [
        {"name": "test", "namespace": "youssef", "labels": {"app": "test"}, "ips": ["127.0.0.2"]}
    ]
    dump_yaml(agent, f"{work}/agent.yaml")
    proxy["dns"].update(listen=["127.0.0.1:0"], upstream=upstream, upstream_timeout_ms=500)
    proxy["socket"] = f"{work}/agent.sock"
    proxy["state_dir"] = f"{work}/dnsproxy-state"
    proxy["admin"] = {"listen": proxy_admin}
    proxy["datapath"] = {"bpffs": f"{work}/bpffs"}
    dump_yaml(proxy, f"{work}/dnsproxy.yaml")

    # Debian's promtool has no Kubernetes service discovery: check the rest of prometheus.yml
    # with a static target in its place, and its relabeling here, on the targets discovery
    # would make of the DaemonSets' pods.
    (prometheus,) = load_yaml_documents("deploy/prometheus/prometheus.yml")
    problems.extend(check_scrape_targets(prometheus, daemonsets))
    if problems:
        fail(problems)
    for job in prometheus.get("scrape_configs", []):
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    prometheus["rule_files"] = [
        os.path.abspath(os.path.join("deploy/prometheus", rules)) for rules in prometheus.get("rule_files", [])
    ]
    dump_yaml(prometheus, f"{work}/prometheus-k8s-static.yml")
    print("deploy/ and provisioning files parse; lab configs written")


def discovered_targets(template, pod_ip):
    """The targets Prometheus's Kubernetes pod discovery makes of a pod: one per declared port
    of each container (init containers too), one per container without ports."""
    meta = template.get("metadata", {})
    base = {"__meta_kubernetes_pod_node_name": "node-1", "__meta_kubernetes_pod_name": "pod-1"}
    for key, value in meta.get("labels", {}).items():
        base["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    for key, value in meta.get("annotations", {}).items():
        base["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    spec = template.get("spec", {})
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        ports = container.get("ports") or []
        if not ports:
            yield dict(base, __address__=pod_ip, __meta_kubernetes_pod_container_name=container["name"])
        for port in ports:
            yield dict(
                base,
                __address__=f"{host}:{port['containerPort']}",
                __meta_kubernetes_pod_container_name=container["name"],
                __meta_kubernetes_pod_container_port_name=port.get("name", ""),
                __meta_kubernetes_pod_container_port_number=str(port["containerPort"]),
            )


def relabel(labels, rules):
    """Prometheus's relabeling (the replace, keep and drop actions), or None if dropped. Any
    other action is an error: passing over it, the check would pass on rules it never ran."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action not in ("replace", "keep", "drop"):
            raise ValueError(f"relabel action {action!r} is not simulated here")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            # $1, ${1}: the group, or nothing when the regex has no such group (as in Go).
            def group(ref):
                number = int(ref.group(1) or ref.group(2))
                return (match.group(number) or "") if number <= len(match.groups()) else ""

            result = re.sub(r"\$\{(\d+)\}|\$(\d+)", group, rule.get("replacement", "$1"))
            if result:
                labels[rule["target_label"]] = result
            else:
                labels.pop(rule["target_label"], None)
    return labels


def check_scrape_targets(prometheus, daemonsets):
    """Each job scrapes exactly one target per pod of its DaemonSet, at the annotation's port,
    on IPv4 and IPv6 pod addresses alike."""
    problems = []
    jobs = {job["job_name"]: job for job in prometheus.get("scrape_configs", [])}
    for name, daemonset in daemonsets.items():
        job = jobs.get(name)
        if job is None:
            problems.append(f"prometheus.yml: no scrape job {name}")
            continue
        template = daemonset["spec"]["template"]
        port = template["metadata"].get("annotations", {}).get("prometheus.io/port")
        for pod_ip in ("10.0.0.7", "fd00::7"):
            host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
            kept = [
                labels
                for labels in (relabel(t, job.get("relabel_configs", [])) for t in discovered_targets(template, pod_ip))
                if labels is not None
            ]
            # Targets whose labels end up alike are one to Prometheus.
            addresses = sorted({labels["__address__"] for labels in kept})
            if addresses != [f"{host}:{port}"]:
                problems.append(f"prometheus.yml: job {name} scrapes {addresses} of a pod at {pod_ip}, not {host}:{port}")
            for labels in kept:
                if labels.get("node") != "node-1" or labels.get("__metrics_path__") != "/metrics":
                    problems.append(f"prometheus.yml: job {name} labels its target {labels}")
        for other, daemonset_other in daemonsets.items():
            if other == name:
                continue
            strays = [t for t in discovered_targets(daemonset_other["spec"]["template"], "10.0.0.8") if relabel(t, job.get("relabel_configs", []))]
            if strays:
                problems.append(f"prometheus.yml: job {name} scrapes {other}'s pods too")
    return problems


LAB_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: lab
  namespace: youssef
spec:
  endpointSelector:
    matchLabels:
      app: test
  egress:
  - toPorts:
    - ports:
      - port: "{port}"
        protocol: ANY
      rules:
        dns:
        - matchName: cilium.io
        - matchPattern: "*.cilium.io"
"""


def families(scrape_path):
    """Metric families of a text exposition: name -> type (from the TYPE lines)."""
    found = {}
    with open(scrape_path, encoding="utf-8") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 4 and parts[:2] == ["#", "TYPE"]:
                found[parts[2]] = parts[3]
    return found


def check_names(scrape_path, name_files):
    found = families(scrape_path)
    series_names = set(found)
    for name, kind in found.items():
        if kind in ("histogram", "summary"):
            series_names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    missing = []
    for path in name_files:
        with open(path, encoding="utf-8") as handle:
            for name in handle.read().split():
                if name not in series_names:
                    missing.append(f"{path}: {name} is not in the scrape {scrape_path}")
    if missing:
        fail(missing)
    print(f"every metric name is in {os.path.basename(scrape_path)} ({len(found)} families)")


def check_docs(scrape_path, doc_path):
    found = set(families(scrape_path))
    documented = set()
    with open(doc_path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("| `warden_"):
                documented.add(line.split("`")[1])
    problems = [f"{name}: in the scrape, not in {doc_path}" for name in sorted(found - documented)]
    problems += [f"{name}: in {doc_path}, not in the scrape" for name in sorted(documented - found)]
    if problems:
        fail(problems)
    print(f"{doc_path} lists the {len(found)} metric families of the scrape")


def free_port():
    """A port free for TCP and UDP on 127.0.0.1, below the kernel's ephemeral range: one the
    kernel chose (bind to port 0) went back into that range, where the processes started
    next took it for a socket of their own now and then (the dnsproxy then failed to bind
    its admin API on it), as the end-to-end tests' ports do not (tests/src/net.rs)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="utf-8") as ranges:
            start = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        start = 32768
    low = 10000
    for _ in range(64):
        port = random.randrange(low, max(start, low + 1))
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        print(port)
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        print(probe.getsockname()[1])


def json_get(path, keys):
    with open(path, encoding="utf-8") as handle:
        value = json.load(handle)
    for key in keys:
        value = value[int(key)] if isinstance(value, list) else value[key]
    print(value)


def main(argv):
    commands = {
        "dashboards": lambda args: dashboards(*args),
        "rule-names": lambda args: rule_names(args[0], args[1:]),
        "configs": lambda args: configs(*args),
        "check-names": lambda args: check_names(args[0], args[1:]),
        "check-docs": lambda args: check_docs(*args),
        "free-port": lambda args: free_port(),
        "json-get": lambda args: json_get(args[0], args[1:]),
    }
    if len(argv) < 2 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    commands[argv[1]](argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
