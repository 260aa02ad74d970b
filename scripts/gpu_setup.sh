#!/usr/bin/env bash
# Set up jaxserve on the GPU image (jax 0.11.2 + CUDA 13 plugin preinstalled, no internet):
# wheels carried in .whl/ for what the image lacks, then an editable install without dependencies.
set -e
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/pip-e.log 2>&1 || { cat /tmp/pip-e.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, jaxserve.models; print('jax', jax.__version__, jax.devices())"
