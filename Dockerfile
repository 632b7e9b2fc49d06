# Build stage: a release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tollgate

# Runtime stage: a small image running as a non-root user. /var/lib/tollgate
# holds the embedded SQLite database (when no Postgres URL is given) and the
# usage spool; mount a volume there so neither is lost with the container.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tollgate tollgate \
    && install -d -o tollgate -g tollgate /var/lib/tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY config/tollgate.example.toml /etc/tollgate/tollgate.toml
USER tollgate
WORKDIR /var/lib/tollgate
VOLUME /var/lib/tollgate
ENV TOLLGATE_SERVER__LISTEN=0.0.0.0:8080 \
    TOLLGATE_ADMIN__LISTEN=0.0.0.0:8081 \
    TOLLGATE_LOG__FORMAT=json
# 8080: the OpenAI-compatible API. 8081: the admin API and /metrics; keep it
# off the public network.
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=2s --start-period=20s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
