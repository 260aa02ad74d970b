# jaxserve OpenAI-compatible server on NVIDIA GPUs.
#   docker build -t jaxserve .                       (CUDA 13; --build-arg JAX_EXTRA=cuda12 CUDA_IMAGE=... for 12)
#   docker run --gpus all -p 8000:8000 jaxserve --model /models/llama --api-key sk-...
# Arguments after the image name go to `python -m jaxserve.serve`. The server binds 0.0.0.0 inside the
# container through JAXSERVE_HOST (an ENV, so it still holds when `docker run` replaces CMD's arguments).
# jax[cudaXX] brings the CUDA user-space libraries as wheels; the base image supplies the driver glue.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${CUDA_IMAGE}
ARG JAX_EXTRA=cuda13

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    JAXSERVE_HOST=0.0.0.0 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/jaxserve
COPY . .
# nvidia-ml-py: NVML for the jaxserve:gpu_utilization / gpu_memory_used_bytes metrics.
RUN pip install --upgrade pip \
 && pip install ".[${JAX_EXTRA}]" nvidia-ml-py

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD curl -fsS http://localhost:8000/health || exit 1
ENTRYPOINT ["python", "-m", "jaxserve.serve"]
CMD ["--port", "8000"]
