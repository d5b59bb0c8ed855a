# syntax=docker/dockerfile:1
# One image for all of meshlet: meshlet-control (the control plane), meshlet-proxy (the sidecar
# and, as `meshlet-proxy init`, the iptables init container) and meshletctl.
#
#   docker build -t ghcr.io/meshlet/meshlet:0.1.0 .
#
# The chart (charts/meshlet) runs the control plane from it and injects it into pods.

# ---- build
# The toolchain benches/link_order.py wrote sidecar/link-order.txt with: symbol names carry a
# hash of the compiler version, so another one would link the sidecar without that order.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
# The whole workspace (cargo needs every member's manifest); .dockerignore leaves target/ out.
COPY . .
# Caches survive between builds (BuildKit); the binaries are copied out of the cached target
# and stripped of their symbol tables there (the dist profile keeps them for the sidecar's link
# order, sidecar/build.rs; stripping after the link leaves the code where the linker put it).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile dist -p meshlet-control -p meshlet-proxy -p meshletctl \
 && mkdir -p /out \
 && cp target/dist/meshlet-control target/dist/meshlet-proxy target/dist/meshletctl /out/ \
 && strip /out/*

# ---- runtime
FROM debian:bookworm-slim
# iptables: `meshlet-proxy init` runs iptables-save/iptables-restore (and the ip6tables ones)
# in the pod's network namespace. ca-certificates: HTTPS to a JWKS or an OTLP collector.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1337 meshlet \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin meshlet \
 && install -d -o 1337 -g 1337 -m 0700 /var/lib/meshlet
COPY --from=build /out/meshlet-control /out/meshlet-proxy /out/meshletctl /usr/local/bin/
# The sidecar's UID, which the capture rules exempt; the init container runs as root through
# its own securityContext (runAsUser 0 with NET_ADMIN and NET_RAW only).
USER 1337:1337
EXPOSE 15000 15001 15006 15012 15014 15017
CMD ["meshlet-control", "serve"]
