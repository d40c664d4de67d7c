# syntax=docker/dockerfile:1.7
# A GPU training worker. TensorFlow with CUDA comes from the official GPU base image;
# the trainer turns on XLA, mixed precision and a tf.distribute strategy there.
# The TensorFlow the project is tested with (2.21): the stubs grpcio-tools 1.85 makes need
# protobuf >= 6.31, which older TensorFlow releases refuse.
ARG TF_IMAGE=tensorflow/tensorflow:2.21.0-gpu

FROM ${TF_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY cloud_trainer ./cloud_trainer
COPY protos ./protos
COPY tools ./tools
# --system-site-packages keeps the base image's CUDA-enabled TensorFlow, and with it the
# image's own pip: the venv is made --without-pip, since the base image's Python may lack
# ensurepip (Debian/Ubuntu ship it apart, in python3-venv), and that pip installs into it.
RUN python3 -m venv --without-pip --system-site-packages /opt/venv \
 && /opt/venv/bin/python -m pip install "grpcio-tools==1.85.1" \
 && /opt/venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/booth.proto \
 && /opt/venv/bin/python tools/requirements.py --extra cloud --without "tensorflow*" > /tmp/requirements.txt \
 && /opt/venv/bin/python -m pip install -r /tmp/requirements.txt \
 && /opt/venv/bin/python -m pip install --no-deps . \
 && /opt/venv/bin/python -m pip check \
 && /opt/venv/bin/python tools/fetch_models.py --dest /opt/models

FROM ${TF_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/booth --create-home booth \
 && install -d -o booth -g booth /var/lib/booth/var /var/lib/booth/base
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
USER booth
WORKDIR /var/lib/booth
ENTRYPOINT ["booth"]
CMD ["worker", "--config", "/etc/booth/booth.yaml"]
