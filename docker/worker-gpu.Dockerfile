# syntax=docker/dockerfile:1.7
# A GPU training worker. TensorFlow with CUDA comes from the official GPU base image;
# the trainer turns on XLA, mixed precision and a tf.distribute strategy there.
ARG TF_IMAGE=tensorflow/tensorflow:2.18.0-gpu

FROM ${TF_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY cloud_trainer ./cloud_trainer
COPY protos ./protos
COPY tools ./tools
# --system-site-packages keeps the base image's CUDA-enabled TensorFlow.
RUN python -m venv --system-site-packages /opt/venv \
 && /opt/venv/bin/pip install "grpcio-tools==1.85.1" \
 && /opt/venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/booth.proto \
 && /opt/venv/bin/pip install fastapi uvicorn jinja2 python-multipart "google-cloud-storage>=2.16" "google-cloud-pubsub>=2.21" "sqlalchemy>=2.0" "psycopg[binary]>=3.1" argon2-cffi prometheus-client matplotlib scikit-image \
 && /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python tools/fetch_models.py --dest /opt/models

FROM ${TF_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/booth --create-home booth
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
USER booth
WORKDIR /var/lib/booth
ENTRYPOINT ["booth"]
CMD ["worker", "--config", "/etc/booth/booth.yaml"]
