"""Offline throughput benchmark (after vLLM's benchmark_throughput.py): all prompts go to `jaxserve.LLM`
at once and the engine batches them as it likes; reports requests/s and tokens/s over the wall time of
`generate`, beside the hardware limits (gpt-fast style).

    python scripts/bench_throughput.py --model benchmarks/configs/llama3-8b.json --load-format dummy \
        --skip-tokenizer-init --dtype bfloat16 --dataset sharegpt-like --num-prompts 1000 --output-json out/t.json

--model is a HF folder, a benchmark config .json (copied into a temp folder as config.json; pair it with
--load-format dummy), or nothing (the embedded SmolLM2-135M-Instruct). Every engine flag of
`python -m jaxserve.serve` is accepted. Prompts are random token ids (scripts/common.py), sampled with
temperature 1.0 and ignore_eos=True, so each request produces exactly its output length.

Beside the throughput:
- achieved weight bandwidth = weight bytes read per step (all layer weights + LM head) x engine steps /
  time. A lower bound on HBM traffic (KV reads and activations are left out); decode-heavy runs are
  bound by it, so compare with the copy bandwidth (--peak-tbps);
- MFU = 2 x matmul params x (prompt + output tokens) / time, over --peak-tflops (attention FLOPs left out).
Peaks default to measured figures for known GPUs (H100: 790 TFLOP/s bf16, 3.0 TB/s); on CPU the achieved
numbers are printed without a share. One uncounted warm-up generate (a few short requests) comes first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (detect_peaks, matmul_params, random_dataset,  # noqa: E402
                    sharegpt_like_dataset, weight_bytes_per_step)

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from jaxserve.config import EngineArgs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p.add_argument_group("engine"))
    g = p.add_argument_group("benchmark")
    g.add_argument("--dataset", choices=["random", "sharegpt-like"], default="random")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens")
    g.add_argument("--output-len", type=int, default=128, help="random: output tokens")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [len*(1-r), len] (default 0: exact)")
    g.add_argument("--dataset-seed", type=int, default=0)
    g.add_argument("--peak-tflops", type=float, default=None, help="matmul peak for MFU (default: detected)")
    g.add_argument("--peak-tbps", type=float, default=None, help="copy bandwidth (default: detected)")
    g.add_argument("--output-json", default=None)
    g.add_argument("--disable-tqdm", action="store_true")
    return p.parse_args(argv)


def make_samples(ns: argparse.Namespace, vocab: int):
    rng = np.random.default_rng(ns.dataset_seed)
    offset = min(100, vocab // 4)  # skip the special ids at the bottom of real vocabularies
    if ns.dataset == "random":
        return random_dataset(rng, ns.num_prompts, ns.input_len, ns.output_len, ns.random_range_ratio, vocab, offset)
    return sharegpt_like_dataset(rng, ns.num_prompts, vocab, offset)


def main(argv: list[str] | None = None) -> dict:
    ns = parse_args(argv)
    import jax

    from jaxserve import LLM
    from jaxserve.config import EngineArgs
    from jaxserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**vars(EngineArgs.from_cli_args(ns)))
    startup = time.perf_counter() - t0
    engine = llm.llm_engine
    arch, mc = engine.arch, engine.model_config
    samples = make_samples(ns, arch.vocab_size)
    too_long = [s for s in samples if len(s.prompt) + s.output_len > mc.max_model_len]
    if too_long:
        raise SystemExit(f"{len(too_long)} requests exceed max_model_len {mc.max_model_len}; "
                         f"pass a larger --max-model-len or shorter lengths")

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True, detokenize=False)

    # Warm-up, not counted: compiles whatever the warm-up at engine start left lazy.
    warm = samples[:min(4, len(samples))]
    llm.generate([{"prompt_token_ids": s.prompt[:32]} for s in warm], params(4), use_tqdm=False)

    steps0 = engine.stats_counters["num_steps"]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": s.prompt} for s in samples], [params(s.output_len) for s in samples],
                        use_tqdm=not ns.disable_tqdm)
    elapsed = time.perf_counter() - t0
    steps = engine.stats_counters["num_steps"] - steps0

    in_tokens = sum(len(o.prompt_token_ids) for o in outs)
    out_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    device_kind = jax.devices()[0].device_kind
    peak_tflops, peak_tbps = detect_peaks(device_kind)
    # Per device, times the tensor-parallel devices that read and multiply in parallel (as bench_latency.py).
    tp = getattr(ns, "tensor_parallel_size", 1) or 1
    peak_tflops = (ns.peak_tflops or peak_tflops or 0) * tp or None
    peak_tbps = (ns.peak_tbps or peak_tbps or 0) * tp or None
    wbytes = weight_bytes_per_step(arch, ITEMSIZE.get(mc.dtype, 4))
    tbps = wbytes * steps / elapsed / 1e12
    tflops = 2 * matmul_params(arch) * (in_tokens + out_tokens) / elapsed / 1e12
    result = {
        "model": mc.served_model_name, "dtype": mc.dtype, "device": device_kind, "dataset": ns.dataset,
        "num_requests": len(outs), "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "elapsed_s": elapsed, "startup_s": startup, "engine_steps": steps,
        "requests_per_s": len(outs) / elapsed, "tokens_per_s": (in_tokens + out_tokens) / elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "weight_bytes_per_step": wbytes, "achieved_weight_tbps": tbps, "achieved_tflops": tflops,
        "peak_tbps": peak_tbps, "peak_tflops": peak_tflops,
        "bandwidth_share": tbps / peak_tbps if peak_tbps else None,
        "mfu": tflops / peak_tflops if peak_tflops else None,
    }
    bw = f"{tbps * 1e3:.4g} GB/s weight reads" + (f" ({result['bandwidth_share']:.0%} of {peak_tbps} TB/s)"
                                               if peak_tbps else "")
    mfu = f"{tflops:.4g} TFLOP/s" + (f" (MFU {result['mfu']:.1%} of {peak_tflops})" if peak_tflops else "")
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.2f} total tokens/s, "
          f"{result['output_tokens_per_s']:.2f} output tokens/s | {bw} | {mfu} | "
          f"{len(outs)} requests, {in_tokens} + {out_tokens} tokens, {steps} steps in {elapsed:.2f} s on {device_kind}")
    if ns.output_json:
        Path(ns.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.output_json).write_text(json.dumps({**result, "args": vars(ns)}, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
