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


def split_in_two(batch: InputBatch, max_seqs: int) -> tuple[InputBatch, InputBatch, np.ndarray] | None:
    """Cut a step's token axis in half for two pipeline micro-batches (stage s runs half 1 while stage s + 1 runs
    half 0). Half 0 is tokens [0, T/2), half 1 tokens [T/2, T), each a valid batch of the T/2 bucket.

    A sequence cut by the middle keeps its first tokens in half 0, whose context length then ends at the cut,
    and the rest in half 1. Its KV for the first tokens is written by half 0 before half 1 attends to it: each
    stage runs half 0 before half 1. Returns (half 0, half 1, rows): `rows` picks the step's sampled rows, in
    order, out of the two halves' logits stacked ([2 * B/2, V]). None when the step is not split: prompt
    logprobs, a grown row axis (n > 1 forks), or no real token in half 1.
    """
    T = len(batch.token_ids)
    h, n = T // 2, batch.num_tokens
    B, P = batch.block_tables.shape
    if batch.prompt_logprob_spans or n <= h or h < 8 or B > min(T, max_seqs):
        return None
    Bh = h if batch.decode_only else min(h, max_seqs)  # the T/2 bucket's row count (as build_batch picks)
    qsl, li = batch.query_start_loc, batch.logits_indices
    nseq = int(np.searchsorted(qsl[:B], n, side="left"))  # qsl[b] < n for the real sequences
    k = int(np.searchsorted(qsl[:nseq], h, side="right")) - 1  # the sequence holding token h
    cut = qsl[k] < h
    n0, n1 = (k + 1 if cut else k), nseq - k  # sequences (rows of the tables) in each half
    R = len(batch.rows)
    r0 = int(np.searchsorted(li[:R], h, side="left"))  # sampled rows whose token is in half 0
    if max(n0, n1, r0, R - r0) > Bh:
        return None

    def half(tok: slice, seqs: slice, nq: int, base: int, rows: slice, first: int) -> InputBatch:
        tables = np.zeros((Bh, P), np.int32)
        lens = np.zeros(Bh, np.int32)
        q = np.full(Bh + 1, nq, np.int32)
        idx = np.zeros(Bh, np.int32)
        m = seqs.stop - seqs.start
        tables[:m] = batch.block_tables[seqs]
        lens[:m] = batch.seq_lens[seqs]
        q[:m] = np.maximum(qsl[seqs] - base, 0)
        idx[:rows.stop - rows.start] = li[rows] - base
        out = InputBatch(batch.token_ids[tok].copy(), batch.positions[tok], batch.slot_mapping[tok],
                         np.maximum(batch.token_seq_ids[tok] - first, 0).astype(np.int32), tables, lens, q, idx,
                         batch.decode_only, [], nq, [])
        if batch.fill_dst is not None:
            live = (batch.fill_dst >= base) & (batch.fill_dst < base + h)
            out.fill_dst = np.full(Bh, h, np.int32)
            out.fill_src = np.zeros(Bh, np.int32)
            out.fill_dst[:live.sum()] = batch.fill_dst[live] - base
            out.fill_src[:live.sum()] = batch.fill_src[live]
        return out

    h0 = half(slice(0, h), slice(0, n0), h, 0, slice(0, r0), 0)
    if cut:  # sequence k's context in half 0 ends at the cut
        h0.seq_lens[k] -= qsl[k + 1] - h
    h1 = half(slice(h, T), slice(k, nseq), n - h, h, slice(r0, R), k)
    rows = np.zeros(len(li), np.int32)
    rows[:r0] = np.arange(r0)
    rows[r0:R] = Bh + np.arange(R - r0)
    return h0, h1, rows
