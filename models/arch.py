"""Architecture facts read from a HF `config.json` into one frozen dataclass.

Reads rope settings from both the classic `rope_theta`/`rope_scaling` fields and transformers 5's
`rope_parameters`, and the dtype from `torch_dtype` or transformers 5's `dtype`. Everything the
model, loader and cache need is here; nothing downstream reads the raw JSON.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "half": "float16",
           "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: tuple = ()  # sorted (key, value) pairs, hashable for jit static args
    sliding_window: int | None = None
    checkpoint_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        d, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        o = self.num_heads * self.head_dim * d
        per_layer = qkv + o + 3 * d * i + 2 * d
        if self.qkv_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        head = 0 if self.tie_word_embeddings else v * d
        return self.num_layers * per_layer + v * d + head + d

    def rope_inv_freq(self) -> np.ndarray:
        """f32[head_dim // 2] inverse frequencies, with llama3 / linear scaling applied as HF does."""
        dim = self.head_dim
        # float32 arithmetic, as transformers computes it, so positions far out agree to the ulp.
        exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv = (np.float32(1.0) / (np.float32(self.rope_theta) ** exps)).astype(np.float64)
        sc = dict(self.rope_scaling)
        kind = sc.get("rope_type", sc.get("type", "default"))
        if kind == "llama3":
            factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
            old_len = sc["original_max_position_embeddings"]
            lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
            inv = np.where(medium, smoothed, scaled)
        elif kind == "linear":
            inv = inv / sc["factor"]
        elif kind not in ("default", None):
            raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
        return inv.astype(np.float32)


def _rope(cfg: dict) -> tuple[float, tuple]:
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = {}
    return float(theta), tuple(sorted((k, v) for k, v in (scaling or {}).items() if not isinstance(v, list)))


def arch_from_dict(cfg: dict) -> ArchConfig:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
                         f"jaxserve supports: {', '.join(SUPPORTED_ARCHITECTURES)}")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    window = cfg.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        window = None
    dtype = _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), "float32")
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
    return ArchConfig(
        architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        rope_scaling=scaling, sliding_window=window, checkpoint_dtype=dtype,
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, extra=cfg)


def load_arch(model_dir: str | Path) -> ArchConfig:
    path = Path(model_dir) / "config.json"
    with open(path) as f:
        return arch_from_dict(json.load(f))
