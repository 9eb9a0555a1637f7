#!/usr/bin/env bash
# The observability checks of `make test`:
#  1. dashboards/*.json load, and every panel query parses (as a recording rule, through
#     `promtool check rules`); the alerting rules parse and pass their unit tests
#     (`promtool test rules`); the Prometheus configurations, Grafana provisioning files and
#     Kubernetes manifests parse, and the policies of the manifests validate;
#  2. a real warden-agent (target/debug), started on the config of the Kubernetes ConfigMap with
#     only its addresses and folders replaced, answers a few queries from dig; its /metrics
#     passes `promtool check metrics`, holds every warden_* name the dashboards and alerting
#     rules use, and is exactly the list of docs/observability.md;
#  3. the same for warden-dnsproxy, when target/debug/warden-dnsproxy is built.
# Everything it starts runs on 127.0.0.1 and is stopped, and its files removed, on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/debug"
helper=(python3 scripts/observability_check.py)

step() { printf 'check-observability: %s\n' "$*"; }
die() {
  printf 'check-observability: FAILED: %s\n' "$*" >&2
  exit 1
}

for tool in promtool dig curl python3; do
  command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh installs it)"
done
python3 -c 'import yaml' 2>/dev/null || die "python3-yaml is missing (apt-get install python3-yaml)"
[[ -x "$bin/warden-agent" && -x "$bin/warden" ]] ||
  die "$bin/warden-agent is not built (cargo build --workspace --bins)"

work=$(mktemp -d "${TMPDIR:-/tmp}/warden-observability.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# --- 1. files --------------------------------------------------------------------------

step "dashboards"
"${helper[@]}" dashboards "$work/dashboard-rules.json" "$work/dashboard-names.txt"
promtool check rules "$work/dashboard-rules.json" >"$work/promtool.out" 2>&1 ||
  die "a dashboard query does not parse: $(cat "$work/promtool.out")"

step "alerting rules"
rules=(deploy/prometheus/*-alerts.yaml)
promtool check rules "${rules[@]}"
promtool test rules deploy/prometheus/*_test.yaml
"${helper[@]}" rule-names "$work/rule-names.txt" "${rules[@]}"

step "Prometheus, Grafana and Kubernetes files"
upstream_port=$("${helper[@]}" free-port)
agent_admin="127.0.0.1:$("${helper[@]}" free-port)"
proxy_admin="127.0.0.1:$("${helper[@]}" free-port)"
"${helper[@]}" configs "$work" "127.0.0.1:$upstream_port" "$agent_admin" "$proxy_admin"
promtool check config deploy/prometheus/prometheus-local.yml
promtool check config "$work/prometheus-k8s-static.yml"
"$bin/warden" policy validate "$work"/configmap-policies/*.yaml

# --- 2. and 3. live processes ----------------------------------------------------------

# Waits for ADMIN's /healthz, then for its /v1/status to name a DNS address.
wait_up() {
  local name=$1 admin=$2 log=$3 pid=$4
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || die "$name exited at start:
$(cat "$log")"
    if curl -sf "http://$admin/healthz" >/dev/null &&
      curl -sf "http://$admin/v1/status" >"$work/$name-status.json"; then
      return 0
    fi
    sleep 0.1
  done
  die "$name did not answer on $admin:
$(cat "$log")"
}

# dig through NAME's DNS address: denied, allowed (upstream down: SERVFAIL), not an endpoint,
# over UDP and TCP.
queries() {
  local name=$1 admin=$2 dns port
  dns=$("${helper[@]}" json-get "$work/$name-status.json" dns_listen 0)
  port=${dns##*:}
  for transport in +notcp +tcp; do
    for query in "127.0.0.2 bbc.co.uk" "127.0.0.2 cilium.io" "127.0.0.1 example.org"; do
      read -r source qname <<<"$query"
      dig "$transport" +time=2 +tries=1 -b "$source" -p "$port" @127.0.0.1 "$qname" A \
        >>"$work/$name-dig.out" 2>&1 || true
    done
  done
  grep -q 'status: REFUSED' "$work/$name-dig.out" ||
    die "$name did not refuse the denied query:
$(grep -E '^; <<>>|status:' "$work/$name-dig.out")
$name's status: $(curl -s "http://$admin/v1/status")
$name's log:
$(tail -n 30 "$work/$name.log")"
}

# promtool check metrics, names of dashboards and rules, docs.
check_scrape() {
  local name=$1 admin=$2 scrape="$work/$1.prom" out
  curl -sf "http://$admin/metrics" >"$scrape" || die "no /metrics from $name"
  if ! out=$(promtool check metrics <"$scrape" 2>&1) || [[ -n "$out" ]]; then
    die "promtool check metrics on $name's scrape:
$out"
  fi
  step "$name: promtool check metrics is clean ($(grep -c '^warden_' "$scrape") samples)"
  grep -q "^warden_dns_queries_total{.*verdict=\"denied\"" "$scrape" ||
    die "$name counted no denied query"
  "${helper[@]}" check-names "$scrape" "$work/dashboard-names.txt" "$work/rule-names.txt"
  "${helper[@]}" check-docs "$scrape" docs/observability.md
}

step "warden-agent"
RUST_LOG=warn "$bin/warden-agent" --config "$work/agent.yaml" >"$work/agent.log" 2>&1 &
pids+=($!)
wait_up agent "$agent_admin" "$work/agent.log" "${pids[-1]}"
queries agent "$agent_admin"
check_scrape agent "$agent_admin"

if [[ -x "$bin/warden-dnsproxy" ]]; then
  step "warden-dnsproxy"
  RUST_LOG=warn "$bin/warden-dnsproxy" --config "$work/dnsproxy.yaml" >"$work/dnsproxy.log" 2>&1 &
  pids+=($!)
  wait_up dnsproxy "$proxy_admin" "$work/dnsproxy.log" "${pids[-1]}"
  # Its policy and endpoints come from the agent: wait until it is ready before asking.
  ready=no
  for _ in $(seq 100); do
    if curl -sf "http://$proxy_admin/readyz" >/dev/null; then
      ready=yes
      break
    fi
    sleep 0.1
  done
  [[ $ready == yes ]] || die "dnsproxy not ready: $(curl -s "http://$proxy_admin/readyz")
$(tail -n 30 "$work/dnsproxy.log")"
  curl -sf "http://$proxy_admin/v1/status" >"$work/dnsproxy-status.json"
  queries dnsproxy "$proxy_admin"
  check_scrape dnsproxy "$proxy_admin"
else
  step "warden-dnsproxy is not built: its scrape is not checked"
fi

step "all checks passed"
