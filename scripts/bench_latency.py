"""Decode latency per token at fixed batch sizes, against the weight-streaming floor (gpt-fast style).

Runs the engine directly (no HTTP): for each batch size, B requests of `--input-len` random token ids
are prefilled, then `--output-len` decode steps are timed one by one. Prints the median decode step
time, tokens/s, and achieved HBM bandwidth = (weight bytes read per step + KV bytes read) / step
time, beside the copy bandwidth of the devices that read the weights in parallel (`--peak-tbps` per device,
default: the measured copy rate of the device kind, scripts/common.py PEAKS, else 3.0 = the H100's), times the
tensor-parallel size: each of N tensor-parallel devices reads 1/N of every weight, while pipeline stages read
theirs one after another.

  python scripts/bench_latency.py --model benchmarks/configs/llama3-8b --load-format dummy \
      --skip-tokenizer-init --dtype bfloat16 --batch-sizes 1 64 --input-len 128 --output-len 128
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from jaxserve.config import EngineArgs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--peak-tbps", type=float, default=None,
                   help="one device's copy bandwidth to compare with (TB/s; default: by device kind, else 3.0)")
    p.add_argument("--output-json", default=None)
    ns = p.parse_args()
    args = EngineArgs.from_cli_args(ns)
    from jaxserve.engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    eng = LLMEngine.from_engine_args(args)
    startup = time.perf_counter() - t0
    arch = eng.arch
    itemsize = np.dtype(eng.runner.kv_dtype).itemsize
    # Bytes a decode step must read: every layer weight and the LM head (the embedding is gathered).
    weight_bytes = (arch.num_params() - arch.vocab_size * arch.hidden_size *
                    (0 if arch.tie_word_embeddings else 1)) * itemsize
    kv_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * itemsize
    import jax

    from common import detect_peaks
    per_dev = ns.peak_tbps or detect_peaks(jax.devices()[0].device_kind)[1] or 3.0
    tp = args.tensor_parallel_size
    peak = per_dev * tp
    peak_txt = f"{peak:g} TB/s" + (f" = {tp} x {per_dev:g}" if tp > 1 else "")
    rng = np.random.default_rng(0)
    results = []
    for bs in ns.batch_sizes:
        for warm in (True, False):
            for i in range(bs):
                ids = rng.integers(10, arch.vocab_size - 10, ns.input_len).tolist()
                eng.add_request(f"b{bs}-{warm}-{i}", ids, SamplingParams(temperature=0.0, max_tokens=4 if warm else ns.output_len,
                                                                         ignore_eos=True))
            steps, t_first = [], None
            t_start = time.perf_counter()
            while eng.has_unfinished_requests():
                t = time.perf_counter()
                eng.step()
                dt = time.perf_counter() - t
                if t_first is None and eng.scheduler.num_running and all(
                        r.num_output_tokens > 0 for r in eng.scheduler.running):
                    t_first = time.perf_counter() - t_start
                elif t_first is not None:
                    steps.append(dt)
            if warm:
                continue
            med = statistics.median(steps)
            ctx = ns.input_len + ns.output_len / 2
            bw = (weight_bytes + bs * ctx * kv_per_token) / med
            row = dict(batch=bs, input_len=ns.input_len, output_len=ns.output_len, prefill_s=t_first,
                       decode_step_ms=med * 1e3, p90_step_ms=sorted(steps)[int(0.9 * len(steps))] * 1e3,
                       tokens_per_s=bs / med, hbm_tbps=bw / 1e12, hbm_share=bw / (peak * 1e12),
                       floor_ms=weight_bytes / (peak * 1e12) * 1e3, peak_tbps=peak)
            results.append(row)
            print(f"batch {bs:4d}: decode {med * 1e3:8.2f} ms/step (p90 {row['p90_step_ms']:.2f}), "
                  f"{row['tokens_per_s']:9.1f} tok/s, {row['hbm_tbps']:.2f} TB/s "
                  f"({row['hbm_share']:.0%} of {peak_txt}), floor {row['floor_ms']:.2f} ms; "
                  f"prefill {t_first:.3f} s", flush=True)
    out = dict(model=args.model, backend=eng.runner.model.backend.name, dtype=eng.model_config.dtype,
               startup_s=startup, startup=getattr(eng, "startup_times", {}), weight_bytes=weight_bytes,
               results=results)
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
