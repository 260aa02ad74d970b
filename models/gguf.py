"""GGUF -> Hugging Face folder conversion, without torch (used for the default model).

Design notes
- The output is an ordinary HF checkpoint folder (config.json, generation_config.json, model.safetensors,
  tokenizer.json, tokenizer_config.json), so the rest of jaxserve loads the default model through the same
  path as any other checkpoint, and HF transformers can load it too (the reference tests do).
- Weights are dequantized with `gguf.quants.dequantize` and stored as float32: bf16 would round the Q4_1/Q8_0
  dequantized values a second time, and our logits are compared against HF on exactly these weights.
- llama.cpp's convert script permutes the rows of q_proj / k_proj so that its rotary embedding can rotate
  adjacent pairs (x0, x1), (x2, x3), ... instead of HF's halves (x0, x_{D/2}), ...:
      permute(w)   = w.reshape(H, 2, D/2, in).swapaxes(1, 2).reshape(H*D, in)      # HF -> GGUF
  The inverse splits the GGUF rows of each head as (D/2, 2) and swaps back:
      unpermute(w) = w.reshape(H, D/2, 2, in).swapaxes(1, 2).reshape(H*D, in)      # GGUF -> HF
  H is num_attention_heads for q and num_key_value_heads for k (GQA).
- The tokenizer is rebuilt as a `tokenizers` byte-level BPE from the GGUF vocab and merges. The split regex
  follows `tokenizer.ggml.pre` the way llama.cpp does: "smollm" (and starcoder-like vocabularies) split every
  digit apart before the GPT-2 regex, which is exactly `Digits(individual_digits=True)` + `ByteLevel`, the
  pre-tokenizer of SmolLM2's own tokenizer.json. Control tokens (token_type 3) become special added tokens.
- Only the llama architecture is handled: it is all the default model needs. Anything else raises.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

CONVERTER_VERSION = 1  # bump when the output of the conversion changes, so cached folders are rebuilt

# GGUF tensor name (with {i} the block index) -> HF Llama tensor name.
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# tokenizer.ggml.pre values whose split regex is "each digit alone, then GPT-2's" (llama.cpp llama-vocab.cpp).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2_PRE = {"gpt-2", "gpt2", "default", "mpt", "olmo", "jais"}
_CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def read_metadata(reader: GGUFReader) -> dict:
    """All key/value fields of a GGUF file as Python values (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[-1] == GGUFValueType.FLOAT32:
            # float32 -> shortest decimal that rounds back: 1e-05, not 9.999999747378752e-06
            value = [float(str(np.float32(v))) for v in value] if isinstance(value, list) else float(
                str(np.float32(value)))
        meta[key] = value
    return meta


def llama_config(meta: dict) -> dict:
    """HF LlamaConfig fields (config.json, the hub's classic format) from GGUF llama metadata."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise NotImplementedError(f"GGUF architecture {arch!r}: only 'llama' converts")
    g = lambda k, d=None: meta.get(f"llama.{k}", d)  # noqa: E731
    n_heads = g("attention.head_count")
    hidden = g("embedding_length")
    head_dim = g("attention.key_length", hidden // n_heads)
    rope_scaling = None
    if g("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
    elif g("rope.scaling.type") not in (None, "none"):
        raise NotImplementedError(f"GGUF rope scaling {g('rope.scaling.type')!r}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": g("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": g("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": g("context_length"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        "rope_theta": g("rope.freq_base", 10000.0),
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": True,  # set from the tensors in convert_gguf (no output.weight -> tied)
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF row permutation of q_proj/k_proj (kept to test the inverse)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF -> HF: undo permute_qk. w: [n_heads * head_dim, in]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        if key in _TENSOR_NAMES:
            return _TENSOR_NAMES[key].format(i=parts[1])
    elif gguf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[gguf_name]
    raise KeyError(f"GGUF tensor {gguf_name!r} has no HF Llama name")


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in HF (numpy, row-major) shape: [out, in] for matrices.

    GGUF lists dims innermost-first (`tensor.shape` is [in, out]); `tensor.data` is already laid out
    row-major as [out, bytes-per-row], and dequantize expands the last axis to elements."""
    w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    return w.reshape([int(d) for d in reversed(tensor.shape)])


def convert_tensors(reader: GGUFReader, config: dict, progress: bool = True) -> dict[str, np.ndarray]:
    """All tensors, dequantized to float32 and renamed/permuted to HF Llama layout."""
    from tqdm import tqdm

    out = {}
    for tensor in tqdm(reader.tensors, desc="dequantize gguf", unit="tensor", disable=not progress):
        name = hf_tensor_name(tensor.name)
        w = dequantize_tensor(tensor)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    return out


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` (byte-level BPE) equal to the one the GGUF vocab describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer {meta.get('tokenizer.ggml.model')!r}: only byte-level BPE")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    return tok


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    name = lambda key: tokens[meta[key]] if key in meta else None  # noqa: E731
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json as is (no class-specific post-processing)
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{meta['general.architecture']}.context_length", 2048),
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def _write_folder(gguf_path: Path, out: Path, progress: bool) -> None:
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    config = llama_config(meta)
    tensors = convert_tensors(reader, config, progress)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    expected = {hf_tensor_name(n.format(i=i)) for n in _TENSOR_NAMES for i in range(config["num_hidden_layers"])}
    missing = expected - set(tensors) - {"lm_head.weight"}
    if missing:
        raise ValueError(f"GGUF {gguf_path} lacks tensors: {sorted(missing)[:5]} ...")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    files = {
        "config.json": config,
        "generation_config.json": gen,
        "tokenizer_config.json": tokenizer_config(meta),
        "jaxserve_conversion.json": {"converter_version": CONVERTER_VERSION, "source": gguf_path.name,
                                     "general.name": meta.get("general.name")},
    }
    for fname, obj in files.items():
        (out / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    build_tokenizer(meta).save(str(out / "tokenizer.json"))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Convert a llama GGUF into an HF folder at out_dir, atomically.

    The folder is written under a temporary name beside out_dir and renamed into place at the end, so an
    interrupted conversion never leaves a half folder. An existing out_dir is replaced."""
    gguf_path, out = Path(gguf_path), Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary folder
    try:
        _write_folder(gguf_path, tmp, progress)
        if out.exists():  # stale cache: move it aside first (rename over a non-empty dir is not allowed)
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").exists():  # another process won the race and its folder is whole
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
