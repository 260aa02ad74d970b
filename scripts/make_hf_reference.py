"""Write HF transformers reference outputs into tests/data/ (run with a torch venv, not jaxserve's).

    /tmp/venvref/bin/python scripts/make_hf_reference.py [--smollm-dir DIR] [--out tests/data]

Made with Python 3.11, torch 2.13.0+cpu, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0 (the exact
versions are in tests/data/manifest.json). Everything is float32 on CPU, eager attention.

Writes
- smollm2/reference.json + smollm2/logits.npz: for the converted default model (models/default_model.py; make
  it first with jaxserve's venv: `python -c "from jaxserve.models.default_model import default_model_path as p; p()"`)
  and 4 prompts (plain, the chat-templated France question, Chinese, code): prompt ids, argmax of the logits
  at every prompt position, full logits at the last 4 positions, HF `generate` greedy ids (32 new tokens,
  do_sample=False; stops early at eos id 2, which is then the last id), and the top-1 minus top-2 logit
  margin of each greedy step (a near-tie may legitimately flip under another kernel's rounding).
- tiny/<name>/ {config.json, model.safetensors (float32), reference.json, logits.npz}: random seeded
  checkpoints (hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, vocab 512, intermediate 128):
  llama, llama3_rope (llama3 rope_scaling, original_max_position_embeddings 64, so every frequency regime
  occurs for head_dim 16), llama_tied, mistral, qwen2 (nonzero qkv biases), llama_sharded (llama's weights as
  two shards + model.safetensors.index.json). reference.json: 2 prompts of ids and 16 greedy ids each (a plain
  argmax loop, no eos stop); logits.npz: full logits at every prompt position.
  config.json is the hub's classic format (rope_theta, rope_scaling) except qwen2, which keeps the
  `rope_parameters` format transformers 5 writes; loaders meet both. Each folder is reloaded with
  from_pretrained and must reproduce the in-memory model's logits, so the references mean what the files say.
- manifest.json: versions, files with sizes and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
SMOL_PROMPTS = {
    "plain": ("text", "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village,"),
    "chat_france": ("chat", "What is the capital of France?"),
    "chinese": ("text", "AI 的未来发展"),
    "code": ("text", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
}
TINY_PROMPTS = [[1, 17, 42, 300, 7, 99, 511], [1] + [(i * 37 + 11) % 509 + 3 for i in range(79)]]  # 7 and 80 ids
TINY_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=512, intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
                 bos_token_id=1, eos_token_id=2, hidden_act="silu", attention_dropout=0.0)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def default_smollm_dir() -> Path:
    root = Path(os.environ.get("JAXSERVE_CACHE") or Path.home() / ".cache" / "jaxserve").expanduser()
    return root / "models" / "SmolLM2-135M-Instruct"


def margins(scores: list[torch.Tensor]) -> list[float]:
    out = []
    for s in scores:  # s: (1, V) raw logits of one greedy step
        top = torch.topk(s[0].float(), 2).values
        out.append(float(top[0] - top[1]))
    return out


@torch.no_grad()
def smollm_reference(folder: Path, out: Path) -> None:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    out.mkdir(parents=True, exist_ok=True)
    # Which conversion the references were made from: a converter change that alters weights shows here.
    conversion = json.loads((folder / "jaxserve_conversion.json").read_text())
    digest = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    ref = {"model_dir": "<default_model_path()>", "conversion": conversion,
           "model_safetensors_sha256": digest.hexdigest(), "new_tokens": 32, "prompts": {}}
    arrays = {}
    for name, (kind, text) in SMOL_PROMPTS.items():
        if kind == "chat":
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(text).input_ids
        x = torch.tensor([ids])
        logits = model(x).logits[0].float()  # (T, V)
        gen = model.generate(x, max_new_tokens=32, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        new = gen.sequences[0, len(ids):].tolist()
        ref["prompts"][name] = {"kind": kind, "text": text, "prompt_ids": ids, "greedy_ids": new,
                                "greedy_text": tok.decode(new, skip_special_tokens=True)}
        arrays[f"{name}.argmax"] = logits.argmax(-1).numpy().astype(np.int32)
        arrays[f"{name}.last_logits"] = logits[-4:].numpy().astype(np.float32)
        arrays[f"{name}.greedy_margin"] = np.array(margins(gen.logits), np.float32)
        print(f"smollm2 {name}: {len(ids)} prompt ids -> {ref['prompts'][name]['greedy_text']!r}")
    (out / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    np.savez_compressed(out / "logits.npz", **arrays)


def tiny_config(name: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if name in ("llama", "llama_sharded"):
        return LlamaConfig(**TINY_BASE, rope_theta=10000.0)
    if name == "llama3_rope":
        return LlamaConfig(**TINY_BASE, rope_theta=10000.0, rope_scaling=dict(LLAMA3_SCALING))
    if name == "llama_tied":
        return LlamaConfig(**TINY_BASE, rope_theta=10000.0, tie_word_embeddings=True)
    if name == "mistral":
        return MistralConfig(**TINY_BASE, rope_theta=1000000.0, sliding_window=None)
    if name == "qwen2":
        return Qwen2Config(**TINY_BASE, rope_theta=1000000.0, use_sliding_window=False)
    raise KeyError(name)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with O(1) activations and logits (HF's 0.02 init makes near-uniform logits, whose greedy
    ids are too close to ties to compare). Norm weights and biases are off their defaults so they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:  # small next to the layers' outputs, else a tied head echoes the input
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            else:  # (out, in) linear: variance-preserving
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def classic_config(config) -> dict:
    """config.json as hub checkpoints write it: rope_theta / rope_scaling instead of rope_parameters."""
    d = json.loads(config.to_json_string())
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    return d


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    seq, out, gaps = list(ids), [], []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        top = torch.topk(logits, 2)
        out.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
        seq.append(out[-1])
    return out, gaps


@torch.no_grad()
def tiny_reference(name: str, seed: int, out: Path) -> None:
    config = tiny_config(name)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    init_weights(model, seed)
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = json.loads(config.to_json_string()) if name == "qwen2" else classic_config(config)
    cfg.update(architectures=[type(model).__name__], torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")  # tied: the hub convention stores only the embedding
    if name == "llama_sharded":
        keys = sorted(state)
        shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map, total = {}, 0
        for i, part in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: state[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
            total += sum(state[k].numel() * state[k].element_size() for k in part)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    # The references come from the reloaded folder; it must agree with the in-memory model.
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ref, arrays = {"name": name, "architecture": cfg["architectures"][0], "seed": seed, "prompts": []}, {}
    for i, ids in enumerate(TINY_PROMPTS):
        logits = loaded(torch.tensor([ids])).logits[0].float()
        mem = model(torch.tensor([ids])).logits[0].float()
        assert torch.allclose(logits, mem, atol=1e-5, rtol=1e-5), f"{name}: folder != in-memory model"
        new, gaps = greedy(loaded, ids, 16)
        ref["prompts"].append({"prompt_ids": ids, "greedy_ids": new})
        arrays[f"p{i}.logits"] = logits.numpy().astype(np.float32)
        arrays[f"p{i}.greedy_margin"] = np.array(gaps, np.float32)
        print(f"tiny {name} prompt {i}: greedy {new}, min margin {min(gaps):.3f}")
    (folder / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    np.savez_compressed(folder / "logits.npz", **arrays)


def manifest(out: Path) -> None:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[str(p.relative_to(out))] = {"bytes": p.stat().st_size,
                                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    m = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__,
         "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "files": files,
         "total_bytes": sum(f["bytes"] for f in files.values())}
    (out / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    print(f"tests/data: {len(files)} files, {m['total_bytes'] / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm-dir", type=Path, default=default_smollm_dir())
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    args = ap.parse_args()
    torch.manual_seed(0)
    if not (args.smollm_dir / "config.json").exists():
        sys.exit(f"{args.smollm_dir} missing: convert the default model first (see this script's docstring)")
    smollm_reference(args.smollm_dir, args.out / "smollm2")
    for seed, name in enumerate(["llama", "llama3_rope", "llama_tied", "mistral", "qwen2", "llama_sharded"]):
        tiny_reference(name, 1000 + (0 if name == "llama_sharded" else seed), args.out / "tiny")
    manifest(args.out)


if __name__ == "__main__":
    main()
