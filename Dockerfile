# keyward's container image: a multi-stage build (dependencies in their own cached layer), then a
# distroless runtime that runs as a non-root user and works with a read-only root filesystem.
#
#   docker build -t keyward .
#   docker run --read-only -v "$PWD/keyward.toml:/etc/keyward/keyward.toml:ro" keyward
#
# The config is read from /etc/keyward/keyward.toml; audit records go to the volume at
# /var/lib/keyward/audit; a Unix socket listener, if configured, belongs under /run/keyward
# (with --read-only, mount a tmpfs or a volume shared with the agent there).

ARG RUST_VERSION=1.95

# Fully qualified image names, so podman and buildah build this without a registries.conf.
FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# 1. Dependencies only: the manifests with stub sources. This layer is reused until
#    Cargo.toml or Cargo.lock change. Every target Cargo.toml names explicitly needs a stub, or
#    cargo refuses the manifest (tests/it/deploy.rs checks this list against Cargo.toml).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src examples benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && echo 'fn main() {}' > benches/minting.rs \
    && echo 'fn main() {}' > benches/sigv4.rs \
    && echo 'fn main() {}' > examples/bench_upstream.rs \
    && cargo build --release --locked --bin keyward \
    && rm -rf src examples benches

# 2. keyward itself. The embedded default config and the dashboard are compiled in.
COPY src ./src
COPY config ./config
COPY examples ./examples
COPY benches ./benches
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin keyward \
    && mkdir -p /out/audit /out/run /out/ca \
    && cp target/release/keyward /out/keyward

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/keyward /usr/local/bin/keyward
COPY deploy/container/keyward.toml /etc/keyward/keyward.toml
# Owned by the image's non-root user (65532), so they stay writable with --read-only.
COPY --from=build --chown=65532:65532 /out/audit /var/lib/keyward/audit
COPY --from=build --chown=65532:65532 /out/run /run/keyward
# The forward proxy's CA certificate (not its key), for a volume agents mount read-only.
COPY --from=build --chown=65532:65532 /out/ca /var/lib/keyward/ca
USER 65532:65532
# mimalloc returns idle memory sooner with these (10k idle connections: 49 -> 35 MiB RSS with
# connection parking, 323 -> 193 MiB before it; see loadtest/README.md), at a small cost in
# throughput.
ENV MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=0
WORKDIR /var/lib/keyward
VOLUME ["/var/lib/keyward/audit"]
EXPOSE 8080
# `keyward health` asks the admin listener's /readyz: no curl or shell in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/keyward", "health", "--config", "/etc/keyward/keyward.toml"]
ENTRYPOINT ["/usr/local/bin/keyward"]
CMD ["serve", "--config", "/etc/keyward/keyward.toml"]
