# protoserve on CUDA. torch's CUDA wheels bring their own CUDA 13 libraries; the base image
# provides the driver interface and a Python 3.11 for them. The `gpu` extra installs
# onnxruntime-gpu (CUDA 13 too), so `--backend onnx` runs on the GPU as well.
#   docker build -t protoserve:0.1.0 .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -p 9100:9100 -v $PWD/model_store:/models protoserve:0.1.0
FROM nvidia/cuda:13.0.1-base-ubuntu22.04 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml ./
COPY client ./client
COPY server ./server
COPY handlers ./handlers
COPY model_store ./model_store
RUN python3.11 -m venv /opt/protoserve \
 && /opt/protoserve/bin/pip install --no-cache-dir ./client ".[gpu]"

FROM nvidia/cuda:13.0.1-base-ubuntu22.04
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin protoserve
COPY --from=build /opt/protoserve /opt/protoserve
# ProtoFac's compiled CPU solvers cache their machine code where it can be written (/tmp: an emptyDir in
# deploy/k8s, whose root file system is read-only); without it they compile at every load (CPU only).
ENV PATH=/opt/protoserve/bin:$PATH PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba
USER 10001
VOLUME ["/models"]
EXPOSE 50051 8000 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["protoserve", "health", "--address", "127.0.0.1:50051"]
# Metrics bind to loopback unless told otherwise; in a container they must be reachable to be scraped.
# HTTP (the OIP REST binding and the explorer page) is on --host, like gRPC.
ENTRYPOINT ["protoserve", "serve", "--model-store", "/models", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100",
            "--metrics-host", "0.0.0.0", "--http-port", "8000"]
