"""Architecture name (config.json `architectures`) -> Flax model class. Exact names only."""
from __future__ import annotations

import jax.numpy as jnp

from jaxserve.models import llama
from jaxserve.models.arch import SUPPORTED_ARCHITECTURES, ArchConfig

_MODELS = {
    "LlamaForCausalLM": llama.LlamaForCausalLM,
    "MistralForCausalLM": llama.MistralForCausalLM,
    "Qwen2ForCausalLM": llama.Qwen2ForCausalLM,
}
assert set(_MODELS) == set(SUPPORTED_ARCHITECTURES)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(arch: ArchConfig, dtype: str, backend):
    """A model module for `arch` computing in `dtype` with attention `backend`."""
    try:
        cls = _MODELS[arch.architecture]
    except KeyError:
        raise ValueError(f"unsupported model architecture {arch.architecture!r}; "
                         f"jaxserve supports: {', '.join(_MODELS)}") from None
    return cls(cfg=arch, dtype=DTYPES[dtype], backend=backend)
