"""Decode throughput and step time against batch size, from measured runs (a PNG for docs/PERF.md).

Each series is a label and the JSON files of one machine: `bench_latency.py --output-json` files (their
`results` rows: batch, decode_step_ms) and `profile_decode.py --output-json` files (batch, and the step time
without the profiler). Nothing is interpolated: every point is a measured median step.

  python scripts/plot_batch_scaling.py --out docs/perf/batch_scaling_s4.png \
      --series "H100, TP=1" docs/perf/lat_layer_once_h100_s4.json docs/perf/prof256_layer_once_h100_s4.json \
      --series "2 x H200, TP=2" docs/perf/lat_tp2_h200x2_s4.json docs/perf/prof256_tp2_h200x2_s4.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def points(files: list[str]) -> list[tuple[int, float]]:
    """(batch, decode step ms) from bench_latency and profile_decode JSONs, sorted by batch."""
    out = {}
    for f in files:
        d = json.loads(Path(f).read_text())
        for row in d.get("results", []):  # bench_latency
            out[int(row["batch"])] = float(row["decode_step_ms"])
        if "batch" in d and ("step_ms_unprofiled" in d or "step_ms" in d):  # profile_decode
            out[int(d["batch"])] = float(d.get("step_ms_unprofiled") or d["step_ms"])
    if not out:
        raise SystemExit(f"no decode step times in {files}")
    return sorted(out.items())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", nargs="+", action="append", required=True, metavar=("LABEL", "JSON"),
                   help="a label, then the JSON files of one machine/configuration")
    p.add_argument("--title", default="Decode throughput vs batch size (dummy weights, bf16)")
    p.add_argument("--out", required=True)
    ns = p.parse_args(argv)
    series = {s[0]: points(s[1:]) for s in ns.series}
    for label, pts in series.items():
        print(label + ": " + ", ".join(f"batch {b}: {ms:.2f} ms/step = {b / ms * 1e3:,.0f} tok/s" for b, ms in pts))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, pts in series.items():
        bs = [b for b, _ in pts]
        ax1.plot(bs, [b / ms * 1e3 for b, ms in pts], "o-", label=label)
        ax2.plot(bs, [ms for _, ms in pts], "o-", label=label)
    for ax, ylabel in ((ax1, "output tokens/s (decode)"), (ax2, "decode step (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (running sequences)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(ns.title)
    fig.tight_layout()
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(ns.out, dpi=110)
    print(f"wrote {ns.out}")
    return series


if __name__ == "__main__":
    main()
