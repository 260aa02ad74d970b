"""Engine end to end with two attention backends (default: Pallas kernels vs XLA) on the same weights.

Greedy generation of the same prompts through both; reports whether tokens are identical and the
largest difference of the top-5 logprobs at every generated position (logprobs are log_softmax of
the raw logits, so this bounds the logits' disagreement up to a per-row shift). Tokens are compared
up to the first position where the reference's top-2 logprobs are closer than `--tie` (a near tie
may flip under any change of summation order).

  python scripts/compare_backends.py --model benchmarks/configs/llama3-8b.json --load-format dummy \
      --skip-tokenizer-init --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(args, backend: str, prompts, max_tokens: int):
    import dataclasses

    from jaxserve.engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams
    eng = LLMEngine.from_engine_args(dataclasses.replace(args, attention_backend=backend))
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                                  logprobs=5))
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0]
    name = eng.runner.model.backend.name
    del eng
    return name, [done[str(i)] for i in range(len(prompts))]


def main() -> None:
    from jaxserve.config import EngineArgs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p)
    p.add_argument("--backends", nargs=2, default=["pallas_triton", "xla"])
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--tie", type=float, default=1e-2)
    p.add_argument("--output-json", default=None)
    ns, _ = p.parse_known_args()
    extra = {k: getattr(ns, k) for k in ("backends", "num_prompts", "max_tokens", "tie", "output_json")}
    for k in extra:
        delattr(ns, k)
    args = EngineArgs.from_cli_args(ns)
    rng = np.random.default_rng(0)
    from jaxserve.models.arch import load_arch
    from jaxserve.engine_builder import resolve_model_path
    vocab = load_arch(resolve_model_path(args.model)).vocab_size
    # Mixed lengths: short, block-boundary, long (chunked) prompts.
    lens = [5, 16, 33, 128, 700, 1500][:extra["num_prompts"]]
    prompts = [rng.integers(10, vocab - 10, n).tolist() for n in lens]
    results = {}
    for b in extra["backends"]:
        results[b] = run(args, b, prompts, extra["max_tokens"])
    (na, a), (nb, b) = results[extra["backends"][0]], results[extra["backends"][1]]
    rows, all_same = [], True
    for i, (oa, ob) in enumerate(zip(a, b)):
        n_cmp, max_diff = 0, 0.0
        for pos, (ta, tb) in enumerate(zip(oa.token_ids, ob.token_ids)):
            lb = sorted((lp.logprob for lp in ob.logprobs[pos].values()), reverse=True)
            common = set(oa.logprobs[pos]) & set(ob.logprobs[pos])
            max_diff = max([max_diff] + [abs(oa.logprobs[pos][t].logprob - ob.logprobs[pos][t].logprob)
                                         for t in common])
            if ta != tb:
                if len(lb) > 1 and lb[0] - lb[1] < extra["tie"]:
                    break  # a near tie: stop comparing this sequence here
                all_same = False
                break
            n_cmp += 1
        rows.append(dict(prompt_len=lens[i], tokens_compared=n_cmp, identical=oa.token_ids[:n_cmp] ==
                         ob.token_ids[:n_cmp], max_top5_logprob_diff=max_diff))
        print(f"prompt {lens[i]:5d} tokens: {n_cmp}/{len(oa.token_ids)} identical, max |dlogprob| {max_diff:.2e}")
    out = dict(backends=[na, nb], identical=all_same, rows=rows)
    print(json.dumps(out))
    if extra["output_json"]:
        Path(extra["output_json"]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
