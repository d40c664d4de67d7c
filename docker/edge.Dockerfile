# syntax=docker/dockerfile:1.7
# The edge agent for a Coral Dev Board / Coral USB host (arm64). No TensorFlow:
# LiteRT runs the CPU models, and Coral's libedgetpu runs the EdgeTPU delegate.
# Build with: docker buildx build --platform linux/arm64 -f docker/edge.Dockerfile .
ARG DEBIAN=bookworm-20241111-slim

FROM --platform=linux/arm64 debian:${DEBIAN} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY cloud_trainer ./cloud_trainer
COPY protos ./protos
COPY tools ./tools
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install "grpcio-tools==1.85.1" \
 && /opt/venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/booth.proto \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip uninstall -y grpcio-tools \
 && /opt/venv/bin/python tools/fetch_models.py --dest /opt/models

FROM --platform=linux/arm64 debian:${DEBIAN}
ENV DEBIAN_FRONTEND=noninteractive
# Coral's apt repository provides libedgetpu1-std (the EdgeTPU runtime, pinned).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg python3 \
 && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | gpg --dearmor -o /usr/share/keyrings/coral.gpg \
 && echo "deb [signed-by=/usr/share/keyrings/coral.gpg] https://packages.cloud.google.com/apt coral-edgetpu-stable main" > /etc/apt/sources.list.d/coral.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends libedgetpu1-std=16.0 ffmpeg \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --groups video,plugdev --home /var/lib/booth --create-home booth \
 && install -d -o booth -g booth /var/lib/booth/var
# /var/lib/booth/var exists, owned by booth, so the named volume mounted there starts
# out writable by the agent (Docker copies a path's ownership into a new volume).
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER booth
WORKDIR /var/lib/booth
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["booth"]
CMD ["agent", "--config", "/etc/booth/agent.yaml"]
