# syntax=docker/dockerfile:1
# legate's image: a static binary on distroless, run as a non-root user.
#
#   docker build -t legate .
#   docker run --rm --network host legate run --listen 127.0.0.1:6379 --upstream redis.internal:6379
#
# The build stage runs scripts/build-static, the very script CI runs, so the binary the tests
# exercise is the binary this image ships.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY scripts/build-static ./scripts/build-static
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    ./scripts/build-static /out/legate

# distroless/static: no shell, no libc; it has /etc/passwd, /etc/nsswitch.conf and CA roots.
# (legate's TLS uses the webpki roots compiled in, so it needs none of them.)
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/legate /legate
# nonroot in distroless; numeric so Kubernetes' runAsNonRoot can check it.
USER 65532:65532
# No shell or curl here: the health check is legate's own `wait`, against LEGATE_ADMIN
# (default 127.0.0.1:9901, so it works with the admin port on loopback).
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/legate", "wait", "--timeout", "2s"]
ENTRYPOINT ["/legate"]
CMD ["--help"]
