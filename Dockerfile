# Build: docker build -t mosaic-auth-proxy .
# Run:   docker run -p 8080:8080 -v $PWD/proxy.toml:/etc/mosaic-auth-proxy/proxy.toml:ro \
#          -e MEDIA_CLIENT_SECRET mosaic-auth-proxy
FROM rust:1-slim-bookworm AS build
# jemalloc is built from source.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin mosaic-auth-proxy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home proxy
COPY --from=build /src/target/release/mosaic-auth-proxy /usr/local/bin/mosaic-auth-proxy
COPY proxy.toml /etc/mosaic-auth-proxy/proxy.toml
USER proxy
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["mosaic-auth-proxy"]
CMD ["run", "--config", "/etc/mosaic-auth-proxy/proxy.toml", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9901"]
