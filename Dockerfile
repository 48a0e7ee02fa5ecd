# The fhir-operator image: one static (musl) binary on an empty base, run as
# a numeric non-root user. The same image serves `fhir-operator run` (the
# operator, the default command) and `fhir-operator gateway-metrics` (the
# sidecar of every endpoint, started with `--sidecar-image` pointing here).
#
#   docker build -t fhir-operator:0.1.0 .
#
# Linted with hadolint by e2e/tests/dockerfile.rs; not built in CI (no
# container engine there).

ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
# musl-gcc for the C parts of ring (TLS and key generation).
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY operator operator
COPY e2e e2e
RUN cargo build --release --locked -p fhir-operator --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/fhir-operator /fhir-operator

# Nothing but the binary: no shell, no package manager, no libc. The API
# server's CA comes from the service account mount, so no CA bundle is needed.
FROM scratch
COPY --from=build /fhir-operator /fhir-operator
# 65532: the uid the chart's Pod Security context names (runAsNonRoot needs
# a numeric user to check).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/fhir-operator"]
CMD ["run"]
