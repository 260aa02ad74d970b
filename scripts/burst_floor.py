"""What the 320-prompt burst can reach at best: a step-by-step model of the serving benchmark's schedule.

Issue 7's serving row sends 320 ShareGPT-like prompts at once (bench_serving.py --request-rate inf). This replays
that draw (the same seeded lengths) through the scheduler's policy, vLLM v1's: every step runs one token of each
running request, then fills the rest of the token budget with prompt chunks, first come first served, up to
max_num_seqs running requests. A request's first token comes at the end of the step that finishes its prompt,
then one token per step. Each step's time is modelled from the hardware, not measured:

    step = max(5.0 ms, (weights + KV read) / bandwidth, 2 x matmul params x tokens / matmul rate)

i.e. the weights (15.0 GB for Llama-3-8B) and the KV of every running request's context (131 kB a token) read
once at the copy rate, or the step's matmul FLOPs at the measured matmul rate, whichever is longer: a floor, since
a real step pays both partly and more. From the per-request token times it reports what bench_serving reports
(output tok/s, mean TTFT, median TPOT). `--bandwidth`/`--tflops`/`--overhead-ms` de-rate the model towards the
engine's measured rates, to see which figures the measured ones correspond to.

    python scripts/burst_floor.py                          # the H100 floor, budgets 1024 .. 8192
    python scripts/burst_floor.py --bandwidth 2.3 --tflops 450 --overhead-ms 1.0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sharegpt_like_dataset  # noqa: E402


def simulate(ins, outs, budget: int, max_seqs: int, weights_gb: float, kv_kb_per_token: float, bandwidth_tbps: float,
             tflops: float, matmul_params_g: float, min_step_ms: float, overhead_ms: float,
             arrival_spread_s: float = 0.0) -> dict:
    n = len(ins)
    done_prompt = np.zeros(n, int)  # prompt tokens computed
    emitted = np.zeros(n, int)  # output tokens emitted
    first, last = np.full(n, np.nan), np.full(n, np.nan)
    arrival = np.arange(n) / n * arrival_spread_s  # request i reaches the server at arrival[i]
    waiting, running = list(range(n)), []
    t, steps = 0.0, 0
    while waiting or running:
        if not running and arrival[waiting[0]] > t:
            t = arrival[waiting[0]]
        decodes = [r for r in running if done_prompt[r] == ins[r]]
        tokens, chunks = len(decodes), []
        for r in [r for r in running if done_prompt[r] < ins[r]]:  # prompts already being chunked go first
            if tokens < budget:
                chunks.append((r, min(ins[r] - done_prompt[r], budget - tokens)))
                tokens += chunks[-1][1]
        while waiting and arrival[waiting[0]] <= t and tokens < budget and len(running) < max_seqs:  # then new requests, first come first served
            r = waiting.pop(0)
            running.append(r)
            chunks.append((r, min(ins[r], budget - tokens)))
            tokens += chunks[-1][1]
        kv_tokens = sum(done_prompt[r] + emitted[r] for r in decodes) + sum(done_prompt[r] + c for r, c in chunks)
        mem_s = (weights_gb * 1e9 + kv_tokens * kv_kb_per_token * 1e3) / (bandwidth_tbps * 1e12)
        flop_s = 2 * matmul_params_g * 1e9 * tokens / (tflops * 1e12)
        t += max(min_step_ms / 1e3, mem_s, flop_s) + overhead_ms / 1e3
        steps += 1
        for r in decodes:
            emitted[r] += 1
        for r, c in chunks:
            done_prompt[r] += c
            if done_prompt[r] == ins[r]:  # the prompt's last chunk samples the first token
                emitted[r] += 1
                first[r] = t
        for r in [r for r in running if emitted[r] >= outs[r]]:
            last[r] = t
            running.remove(r)
    multi = outs > 1
    tpot = (last[multi] - first[multi]) / (outs[multi] - 1)
    first = first - arrival  # TTFT from each request's arrival
    return dict(budget=budget, steps=steps, duration_s=t, output_tok_s=float(outs.sum() / t),
                mean_ttft_s=float(np.nanmean(first)), median_tpot_ms=float(np.median(tpot) * 1e3),
                mean_tpot_ms=float(np.mean(tpot) * 1e3))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0, help="bench_serving.py's --seed (the same draw)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--max-num-seqs", type=int, default=512, help="the server's default on 80 GB GPUs")
    ap.add_argument("--weights-gb", type=float, default=15.0, help="Llama-3-8B: layers + LM head, bf16")
    ap.add_argument("--kv-kb-per-token", type=float, default=131.072, help="32 layers x 8 kv heads x 128 x 2 x 2 B")
    ap.add_argument("--matmul-params-g", type=float, default=7.0, help="matmul parameters per token (billions)")
    ap.add_argument("--bandwidth", type=float, default=3.0, help="TB/s (an H100's measured copy rate)")
    ap.add_argument("--tflops", type=float, default=790.0, help="TFLOP/s (an H100's measured bf16 matmul rate)")
    ap.add_argument("--min-step-ms", type=float, default=5.0, help="the weights alone at the copy rate")
    ap.add_argument("--overhead-ms", type=float, default=0.0, help="added to every step")
    ap.add_argument("--arrival-spread-s", type=float, default=0.0,
                    help="requests reach the server evenly over this many seconds (0: all at once)")
    ap.add_argument("--output-json", default=None)
    a = ap.parse_args(argv)
    samples = sharegpt_like_dataset(np.random.default_rng(a.seed), a.num_prompts, 128256, 0)
    ins = np.array([len(s.prompt) for s in samples])
    outs = np.array([s.output_len for s in samples])
    print(f"draw: {len(ins)} prompts, {ins.sum()} prompt + {outs.sum()} output tokens, longest output {outs.max()}, "
          f"median output {int(np.median(outs))}")
    rows = []
    for b in a.budgets:
        r = simulate(ins, outs, b, a.max_num_seqs, a.weights_gb, a.kv_kb_per_token, a.bandwidth, a.tflops,
                     a.matmul_params_g, a.min_step_ms, a.overhead_ms, a.arrival_spread_s)
        rows.append(r)
        print(f"budget {b:5d}: {r['steps']:5d} steps, {r['duration_s']:.2f} s, {r['output_tok_s']:7.0f} output tok/s, "
              f"mean TTFT {r['mean_ttft_s']:.3f} s, median TPOT {r['median_tpot_ms']:.1f} ms "
              f"(mean {r['mean_tpot_ms']:.1f})")
    if a.output_json:
        Path(a.output_json).write_text(json.dumps(dict(args=vars(a), rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
