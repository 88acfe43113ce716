# Build: docker build -t mosaic-auth-proxy .
# Run:   docker run -p 8080:8080 -p 9901:9901 \
#          -v $PWD/proxy.toml:/etc/mosaic-auth-proxy/proxy.toml:ro \
#          -e MEDIA_CLIENT_SECRET -e MOSAIC_AUTH_PROXY__SERVER__LISTEN=0.0.0.0:8080 \
#          -e MOSAIC_AUTH_PROXY__SERVER__ADMIN_LISTEN=0.0.0.0:9901 mosaic-auth-proxy
#
# The binary needs glibc and nothing else at run time: the web PKI roots are compiled in
# (tls.native_roots = false), jemalloc is linked statically.
FROM rust:1-slim-bookworm AS build
# jemalloc is built from source.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that a change to the sources rebuilds only the proxy. The rustc
# wrapper and the trained profile (benches/pgo.sh) come with them: every optimized crate is
# compiled with the profile.
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY pgo ./pgo
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && printf 'fn main() {}\n' > benches/hot_path.rs \
 && cargo build --release --locked --bin mosaic-auth-proxy \
 && rm -rf src benches
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin mosaic-auth-proxy

# distroless: glibc, libgcc and a passwd entry for "nonroot"; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mosaic-auth-proxy /usr/local/bin/mosaic-auth-proxy
COPY proxy.toml /etc/mosaic-auth-proxy/proxy.toml
USER nonroot:nonroot
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
# No curl in the image: the binary probes its own admin listener.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD ["/usr/local/bin/mosaic-auth-proxy", "probe", "http://127.0.0.1:9901/livez"]
ENTRYPOINT ["/usr/local/bin/mosaic-auth-proxy"]
CMD ["run", "--config", "/etc/mosaic-auth-proxy/proxy.toml", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9901"]
