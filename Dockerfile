# esmd image: built on Debian 12 with the distribution's libraries, run on debian:12-slim as a
# non-root user. Used by docker-compose.yml (`docker-compose up --build`).

FROM debian:12 AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config \
      librdkafka-dev libpq-dev libhiredis-dev libcjson-dev libev-dev libyaml-dev \
      libcurl4-openssl-dev libmicrohttpd-dev libavro-dev libprotobuf-dev libprotoc-dev \
      libvalijson-dev nlohmann-json3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY cmake ./cmake
COPY include ./include
COPY src ./src
COPY connectors ./connectors
COPY migrations ./migrations
COPY ui ./ui
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DESMD_BUILD_TESTS=OFF \
 && cmake --build build -j"$(nproc)" \
 && strip build/esmd \
 && ./build/esmd version

FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      librdkafka1 libpq5 libhiredis0.14 libcjson1 libev4 libyaml-0-2 libcurl4 \
      libmicrohttpd12 libavro23 libprotobuf32 libprotoc32 ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin esmd
COPY --from=build /src/build/esmd /usr/local/bin/esmd
COPY examples/esmd.yaml /etc/esmd/esmd.yaml
USER esmd
EXPOSE 9000
ENTRYPOINT ["esmd"]
CMD ["run", "-c", "/etc/esmd/esmd.yaml"]
