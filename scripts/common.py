"""Helpers shared by the benchmark scripts: seeded synthetic datasets of token-id prompts, benchmark
config files as model folders, and the hardware peaks that results are compared with.

Datasets (all seeded through the numpy Generator passed in):
- random: input length uniform in [L*(1-r), L], output likewise; r = 0 (the default of every script)
  gives exactly L. Token ids uniform in [offset, vocab).
- sharegpt-like: a synthetic stand-in for ShareGPT's length distribution, no data download. Input and
  output lengths are drawn independently from lognormals with sigma 1.0 whose means are 200 (input) and
  180 (output) tokens: mu = ln(mean) - sigma^2 / 2. Inputs are clipped to [4, 1024] and outputs to
  [1, 2048 - input] (vLLM drops ShareGPT pairs over these limits; we clip), which pulls the realized means
  a little under the targets (about 185 / 165).

Token ids rather than text, so a `--load-format dummy --skip-tokenizer-init` model can be driven without
a tokenizer or a corpus.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Sample:
    prompt: list[int]
    output_len: int


def random_dataset(rng: np.random.Generator, n: int, in_len: int, out_len: int, ratio: float, vocab: int,
                   offset: int) -> list[Sample]:
    ins = rng.integers(max(1, int(in_len * (1 - ratio))), in_len + 1, size=n)
    outs = rng.integers(max(1, int(out_len * (1 - ratio))), out_len + 1, size=n)
    return [Sample(rng.integers(offset, vocab, size=int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


def sharegpt_like_dataset(rng: np.random.Generator, n: int, vocab: int, offset: int, sigma: float = 1.0,
                          mean_in: float = 200, mean_out: float = 180, max_in: int = 1024,
                          max_total: int = 2048) -> list[Sample]:
    ins = np.clip(np.rint(rng.lognormal(math.log(mean_in) - sigma**2 / 2, sigma, size=n)), 4, max_in).astype(int)
    outs = np.rint(rng.lognormal(math.log(mean_out) - sigma**2 / 2, sigma, size=n)).astype(int)
    outs = np.clip(outs, 1, max_total - ins)
    return [Sample(rng.integers(offset, vocab, size=int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


# Peaks to compare with, by substring of jax's device_kind. Measured rates, not datasheet ones (gpt-fast's
# habit): H100 SXM dense bf16 matmul reaches ~790 of the 989 TFLOP/s on the sheet, and a device-to-device
# copy ~3.0 of the 3.35 TB/s. H200: same compute die, HBM3e copy ~4.0 of 4.8 TB/s.
PEAKS = {"H100": (790.0, 3.0), "H200": (790.0, 4.0)}


def detect_peaks(device_kind: str) -> tuple[float | None, float | None]:
    """(TFLOP/s, TB/s) for a known accelerator, else (None, None): CPU numbers are printed bare."""
    for key, peaks in PEAKS.items():
        if key in device_kind:
            return peaks
    return None, None


def weight_bytes_per_step(arch, itemsize: int) -> int:
    """Bytes a forward step must read: every layer weight and the LM head. The input embedding is a gather
    of a few rows, so it is left out unless tied (then it is the LM head)."""
    embed = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
    return (arch.num_params() - embed) * itemsize


def matmul_params(arch) -> int:
    """Parameters that take part in a matmul per token (FLOPs per token ~= 2x this; attention's
    score/value FLOPs are left out, as gpt-fast does)."""
    return weight_bytes_per_step(arch, 1)
