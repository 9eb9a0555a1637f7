# The image the manifests in deploy/kubernetes/ run: warden-agent, warden-dnsproxy and the
# warden CLI, with sh and ip for the init container that puts the DNS address on warden0, and
# kubectl for the container that writes the node's pods into endpoints_dir.
#
#   docker build -t warden:0.1.0 .
#
# Not built by `make test` (the machines it runs on have no container daemon); the build stage
# installs what scripts/setup.sh lists for building, and runs the same cargo build.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm libbpf-dev protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p warden-agent -p warden-dnsproxy --bins

# kubectl, for the agent pod's endpoint-sync container (deploy/kubernetes/warden-agent.yaml).
FROM registry.k8s.io/kubectl:v1.32.4 AS kubectl

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=kubectl /bin/kubectl /usr/local/bin/kubectl
COPY --from=build /src/target/release/warden-agent /src/target/release/warden-dnsproxy \
     /src/target/release/warden /usr/local/bin/
# Both processes need root's capabilities on the node (BPF, NET_ADMIN, binding port 53);
# the manifests grant them.
ENTRYPOINT []
CMD ["warden-agent", "--help"]
