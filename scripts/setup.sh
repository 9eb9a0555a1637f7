#!/usr/bin/env bash
# Installs the system packages Warden's build, tests and demo need. Idempotent: packages
# already present are not touched, and apt is only consulted when something is missing.
set -euo pipefail

packages=(
  clang llvm libbpf-dev bpftool      # eBPF programs (bpf/) and inspecting them
  knot                                # knotd: the real upstream DNS server of the lab
  dnsutils knot-dnsutils dnsperf      # dig, kdig, dnsperf: real clients
  dnsdist                             # the reference forwarder `make bench` compares against
  iproute2 curl procps psmisc         # namespaces, veth, HTTP checks, process tools
  python3 python3-yaml                # lab HTTP servers in namespaces; manifest checks
  prometheus                          # promtool for metrics and rules checks
  protobuf-compiler                   # protoc: the agent ⇄ dnsproxy API (shared/api)
)

missing=()
for pkg in "${packages[@]}"; do
  [[ "$pkg" == \#* ]] && continue
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "setup: all system packages present"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "setup: missing packages (${missing[*]}) and not root; run: sudo $0" >&2
  exit 1
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the servers it installs as services (knotd, dnsdist, Prometheus, listening
# beyond loopback for some); the lab and the bench run their own instances on loopback.
if command -v systemctl >/dev/null 2>&1; then
  for service in knot dnsdist prometheus; do
    systemctl disable --now "$service" >/dev/null 2>&1 || true
  done
fi
echo "setup: done"
