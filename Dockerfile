# Build stage: a release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tollgate

# Runtime stage: a small image running as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY config/tollgate.example.toml /etc/tollgate/tollgate.toml
USER tollgate
ENV TOLLGATE_SERVER__LISTEN=0.0.0.0:8080 TOLLGATE_LOG__FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
