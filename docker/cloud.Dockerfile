# syntax=docker/dockerfile:1.7
# The cloud app (web API, ingest, control, mail sender). Slim: no CUDA.
# gcp-storage-emulator is here for `--profile local` (deploy/README.md), nothing else.
ARG PYTHON_VERSION=3.11.10

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY cloud_trainer ./cloud_trainer
COPY protos ./protos
COPY tools ./tools
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip==24.3.1 \
 && /opt/venv/bin/pip install ".[cloud]" "grpcio-tools==1.85.1" "gcp-storage-emulator>=2024.8" \
 && /opt/venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/booth.proto \
 && /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python tools/fetch_models.py --dest /opt/models

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg=7:5.1.* curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/booth --create-home booth \
 && install -d -o booth -g booth /var/lib/booth/var
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER booth
WORKDIR /var/lib/booth
EXPOSE 8000 50051
HEALTHCHECK --interval=15s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
ENTRYPOINT ["booth"]
CMD ["serve", "--config", "/etc/booth/booth.yaml"]
