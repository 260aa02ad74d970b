"""SchedulerOutput -> fixed-shape numpy arrays of one step (no JAX).

Shapes are padded to buckets so the jitted step compiles once per bucket: the token axis T to the
next bucket of `token_buckets`; the sequence axis B (and the sampled-rows axis S) to
min(T, max_num_seqs bucket), grown when an n > 1 prompt needs more sampled rows; the block-table
width P is fixed at max_model_len / block_size (the attention paths walk only the pages in use).
Padding tokens write into the null block 0 and are never read back; padding rows have seq_len 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxserve.request import Request
from jaxserve.scheduler_output import SchedulerOutput


def make_buckets(max_value: int, start: int = 8, ratio: int = 2) -> list[int]:
    out, b = [], start
    while b < max_value:
        out.append(b)
        b *= ratio
    return out + [max_value]


def pick(buckets: list[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclass
class SampleRow:
    request: Request
    sample_index: int  # which of the request's n samples this row draws (0 unless an n > 1 parent forks)


@dataclass
class InputBatch:
    token_ids: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]
    token_seq_ids: np.ndarray  # i32[T]
    block_tables: np.ndarray  # i32[B, P]
    seq_lens: np.ndarray  # i32[B]
    query_start_loc: np.ndarray  # i32[B + 1]
    logits_indices: np.ndarray  # i32[S]
    decode_only: bool
    rows: list[SampleRow]  # the real sampled rows, in logits_indices order
    num_tokens: int  # real tokens (<= T)
    # (request, first token offset on the T axis, count) for requests that want prompt logprobs
    prompt_logprob_spans: list[tuple[Request, int, int]]
    # Async scheduling: token_ids[fill_dst[i]] is the previous step's sampled id at row fill_src[i]
    fill_dst: np.ndarray | None = None  # i32[B], padded with T (dropped)
    fill_src: np.ndarray | None = None  # i32[B]
    span_layout: list = None  # (request, first row, rows, first prompt position) of prompt-logprob rows


def build_batch(out: SchedulerOutput, *, block_size: int, pages_per_seq: int, token_buckets: list[int],
                max_seqs: int) -> InputBatch:
    sched = out.scheduled
    n_tok = out.num_batched_tokens
    n_seq = len(sched)
    n_rows = sum(s.num_samples for s in sched)
    T = pick(token_buckets, max(n_tok, n_seq, n_rows, 1))
    B = max(min(T, max_seqs), n_seq, n_rows)
    B = pick(token_buckets, B) if B > min(T, max_seqs) else B
    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.zeros(T, np.int32)
    seq_ids = np.zeros(T, np.int32)
    tables = np.zeros((B, pages_per_seq), np.int32)
    seq_lens = np.zeros(B, np.int32)
    qsl = np.full(B + 1, n_tok, np.int32)
    logits_idx = np.zeros(B, np.int32)
    rows: list[SampleRow] = []
    spans = []
    fill_dst, fill_src = [], []
    t = 0
    # Decode rows (one new token) are the bulk at large batch: gather their scalars in Python lists and
    # write each array once; multi-token rows (prefill chunks) use numpy slices.
    d_t, d_tok, d_pos, d_slot = [], [], [], []
    for b, s in enumerate(sched):
        req, n = s.request, s.num_new_tokens
        start = req.num_computed_tokens
        qsl[b] = t
        blocks = req.block_ids
        if n == 1:
            d_t.append(t)
            d_tok.append(req.all_token_ids[start])
            d_pos.append(start)
            d_slot.append(blocks[start // block_size] * block_size + start % block_size)
        else:
            token_ids[t:t + n] = req.all_token_ids[start:start + n]
            pos = np.arange(start, start + n, dtype=np.int32)
            positions[t:t + n] = pos
            slots[t:t + n] = np.asarray(blocks, np.int32)[pos // block_size] * block_size + pos % block_size
        if req.placeholder_row is not None and start + n == req.num_tokens:
            fill_dst.append(t + n - 1)  # the placeholder is always the request's last token
            fill_src.append(req.placeholder_row)
        seq_ids[t:t + n] = b
        tables[b, :len(blocks)] = blocks
        seq_lens[b] = start + n
        if req.sampling_params.prompt_logprobs is not None and start < req.num_prompt_tokens:
            spans.append((req, t, min(n, req.num_prompt_tokens - start)))
        if s.num_samples == 1:
            logits_idx[len(rows)] = t + n - 1
            rows.append(SampleRow(req, req.sample_index))
        else:
            for i in range(s.num_samples):
                logits_idx[len(rows)] = t + n - 1
                rows.append(SampleRow(req, i))
        t += n
    if d_t:
        token_ids[d_t] = d_tok
        positions[d_t] = d_pos
        slots[d_t] = d_slot
    decode_only = n_seq > 0 and n_tok == n_seq and T == B
    batch = InputBatch(token_ids, positions, slots, seq_ids, tables, seq_lens, qsl, logits_idx, decode_only,
                       rows, n_tok, spans)
    if fill_dst:
        batch.fill_dst = np.full(B, T, np.int32)
        batch.fill_src = np.zeros(B, np.int32)
        batch.fill_dst[:len(fill_dst)] = fill_dst
        batch.fill_src[:len(fill_src)] = fill_src
    return batch
