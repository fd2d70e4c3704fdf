# syntax=docker/dockerfile:1
# ibstream: the connector and its simulator (`ibstream sim`) in one small image.
#
#   docker build -t ibstream:0.1.0 .
#   docker run --rm -p 127.0.0.1:9464:9464 -v $PWD/ibstream.toml:/etc/ibstream/ibstream.toml:ro ibstream:0.1.0
#
# The runtime image holds the release binary only, runs as the numeric non-root user 10001,
# and writes nothing outside /tmp, so it runs with a read-only root filesystem.

FROM rust:1.95-bookworm AS build
# librdkafka builds with make (not cmake); the `ssl` feature links OpenSSL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config make g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY schemas ./schemas
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin ibstream \
 && strip target/release/ibstream

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ibstream" \
      org.opencontainers.image.description="Streams a forex broker's CRM (Impact CRM IB Reports API) into Kafka as Avro change events" \
      org.opencontainers.image.source="https://github.com/ibstream/ibstream" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ibstream /usr/local/bin/ibstream
# librdkafka and ibstream write nothing but temporary files, there.
ENV TMPDIR=/tmp
USER 10001:10001
# 9464: /metrics, /health/*, /status; 8089: the simulator.
EXPOSE 9464 8089
ENTRYPOINT ["ibstream"]
CMD ["run"]
