"""L2 prefetch of GEMV weights (pallas_kernels/l2_prefetch.py; measured by scripts/bench_gemv.py and, in the engine,
with JAXSERVE_L2_PREFETCH): the boxes it plans (by hand), the kernel interpreted in both modes and lowered for an
H100, and where models.llama issues it (traced, per weight and step size)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import lower_for_h100

from jaxserve.attention import PallasBackend, XlaBackend, dummy_metadata, get_backend, parse_l2_prefetch
from jaxserve.pallas_kernels import l2_prefetch as l2p
from jaxserve.pallas_kernels.l2_prefetch import l2_prefetch, parse_spec, plan

MiB = 1 << 20


def test_plan_covers_the_first_rows_in_equal_boxes():
    # Llama-3-8B's QKV weight [4096, 8, 6, 128] as [4096, 6144] bf16: 8 MiB = 682.7 rows -> 683 -> 3 boxes of 228
    p = plan((4096, 8, 6, 128), 2, 8 * MiB)
    assert (p.rows, p.cols, p.box_rows, p.band_rows, p.box_cols, p.bands) == (4096, 6144, 228, 684, 256, 1)
    assert p.grid == (1, 3, 24) and p.nbytes * 2 >= 8 * MiB
    # o [32, 128, 4096] with row_dims=2 -> [4096, 4096]: 8 MiB = 1024 rows exactly, 4 boxes of 256
    p = plan((32, 128, 4096), 2, 8 * MiB, row_dims=2)
    assert (p.rows, p.cols, p.band_rows, p.box_rows) == (4096, 4096, 1024, 256)
    # down [14336, 4096] in 4 bands of 2 MiB (256 rows) starting 3584 rows apart
    p = plan((14336, 4096), 2, 8 * MiB, bands=4)
    assert p.grid == (4, 1, 16) and [p.band_start(b) for b in range(4)] == [0, 3584, 7168, 10752]
    # more than the array: capped at the whole of it
    p = plan((64, 256), 2, 100 * MiB)
    assert p.band_rows == 64 and p.nbytes == 64 * 256


@pytest.mark.parametrize("args", [((4096, 6144), 2, 0, 1, 1), ((4096, 6144), 2, MiB, 0, 1), ((4096,), 2, MiB, 1, 1),
                                  ((64, 2, 2), 2, MiB, 1, 1)])  # nothing asked / no bands / 1-D / 8-byte rows
def test_plan_none(args):
    shape, itemsize, nbytes, bands, row_dims = args
    assert plan(shape, itemsize, nbytes, bands, row_dims) is None


@pytest.mark.parametrize("mode", ["prefetch", "load"])
def test_kernel_interpreted_changes_nothing(mode):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((512, 256)), jnp.bfloat16)
    x = jnp.arange(24.0).reshape(8, 3)
    y = jax.jit(lambda w, x: l2_prefetch(w, x, nbytes=96 * 1024, bands=2, mode=mode, interpret=True) * 2)(w, x)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))


@pytest.mark.parametrize("mode", ["prefetch", "load"])
def test_kernel_lowers_for_h100(mode):
    A = jax.ShapeDtypeStruct
    text = lower_for_h100(lambda w, x: l2_prefetch(w, x, nbytes=8 * MiB, mode=mode) + 1,
                          A((4096, 8, 6, 128), jnp.bfloat16), A((8, 4096), jnp.bfloat16))
    assert f"l2_{mode}_1x684x6144" in text and "mosaic_gpu" in text


def test_kernel_result_is_after_in_place():
    """XLA drops a kernel whose result nothing uses (a token tied in by an optimization barrier was dropped, and
    session 16's first GPU runs timed no prefetch at all). Here the Mosaic call's result is `after` itself,
    aliased to its input, and the program's output is computed from it."""
    A = jax.ShapeDtypeStruct
    text = lower_for_h100(lambda w, x: l2_prefetch(w, x, nbytes=MiB) * 3, A((4096, 4096), jnp.bfloat16),
                          A((8, 4096), jnp.bfloat16))
    call = next(line for line in text.splitlines() if "mosaic_gpu" in line and "custom_call" in line)
    assert "output_operand_alias" in call and "operand_index = 1" in call
    assert call.rstrip().endswith("-> tensor<8x4096xbf16>")


@pytest.mark.parametrize("spec,want", [
    ("", ()), ("qkv=8", (("qkv", 8 * MiB, 1),)),
    (" o=0.5x2 , down=16 ", (("o", MiB // 2, 2), ("down", 16 * MiB, 1)))])
def test_parse_spec(spec, want):
    assert parse_spec(spec) == want


@pytest.mark.parametrize("spec", ["attn=8", "qkv", "qkv=0", "qkv=8x0", "qkv=abc", "qkv=8,qkv=4", "o=8x1.5"])
def test_parse_spec_errors(spec):
    with pytest.raises(ValueError, match="prefetch spec"):
        parse_spec(spec)


def test_env_errors_are_clear():
    with pytest.raises(ValueError, match="JAXSERVE_L2_PREFETCH"):
        parse_l2_prefetch("qkv=8,attn=8")


def test_env_reaches_the_mosaic_backend(monkeypatch):
    from jaxserve.pallas_kernels import select
    monkeypatch.setattr(select, "device_attention_backend", lambda override=None: "pallas_mosaic")
    monkeypatch.setenv("JAXSERVE_L2_PREFETCH", "qkv=4,gate_up=2x2")
    monkeypatch.setenv("JAXSERVE_L2_PREFETCH_MAX_TOKENS", "16")
    b = get_backend("pallas_mosaic")
    assert b.l2_prefetch == (("qkv", 4 * MiB, 1), ("gate_up", 2 * MiB, 2)) and b.l2_prefetch_max_tokens == 16
    monkeypatch.setenv("JAXSERVE_L2_PREFETCH_MAX_TOKENS", "-1")
    with pytest.raises(ValueError, match="MAX_TOKENS"):
        get_backend("pallas_mosaic")


def _traced_prefetches(backend, num_tokens, monkeypatch):
    """Trace (no run) a tiny bf16 Llama decode step with `backend`; the l2_prefetch calls it makes per layer
    trace: (weight shape, row_dims, nbytes, bands, rows of `after`)."""
    from jaxserve.models.arch import ArchConfig
    from jaxserve.models.llama import LlamaForCausalLM, abstract_params
    calls = []
    real = l2p.l2_prefetch
    monkeypatch.setattr(l2p, "l2_prefetch", lambda w, after, **k: calls.append(
        (w.shape, k["row_dims"], k["nbytes"], k["bands"], after.shape[0])) or real(w, after, **k))
    cfg = ArchConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=256, intermediate_size=512,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=256)
    model = LlamaForCausalLM(cfg, jnp.bfloat16, backend)
    params, _ = abstract_params(model, num_blocks=8, block_size=16)
    page = jax.ShapeDtypeStruct((2, 8, 16, 64), jnp.bfloat16)
    kv = tuple((page, page) for _ in range(2))
    meta = dummy_metadata(num_tokens, num_tokens, 4, decode_only=True)
    ids = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
    jax.eval_shape(lambda p, kv, t, li: model.apply({"params": p}, t, kv, meta, li), params, kv, ids, ids)
    return calls


def test_model_issues_each_weight_prefetch_on_small_steps(monkeypatch):
    from jaxserve.models import llama
    llama._layer_fn.cache_clear()  # one trace per (config, backend): start from none
    spec = parse_l2_prefetch("qkv=1,o=2x2,gate_up=3,down=4x4")
    backend = PallasBackend(name="pallas_mosaic", interpret=True, l2_prefetch=spec, l2_prefetch_max_tokens=8)
    calls = _traced_prefetches(backend, 8, monkeypatch)
    # one traced layer (models.llama._layer_fn) serves both: qkv [D, K, G+2, E], o [H, E, D] (2 contracted dims),
    # gate/up [D, 2, I], down [I, D], each with its own size and bands, after the step's 8 token rows
    assert sorted(calls) == sorted([((256, 2, 4, 64), 1, MiB, 1, 8), ((4, 64, 256), 2, 2 * MiB, 2, 8),
                                    ((256, 2, 512), 1, 3 * MiB, 1, 8), ((512, 256), 1, 4 * MiB, 4, 8)])
    llama._layer_fn.cache_clear()
    assert _traced_prefetches(backend, 16, monkeypatch) == []  # above l2_prefetch_max_tokens
    for b in (PallasBackend(name="pallas_mosaic", interpret=True), XlaBackend(),  # none asked / not this backend
              PallasBackend(name="pallas_triton", interpret=True, l2_prefetch=spec)):
        llama._layer_fn.cache_clear()
        assert _traced_prefetches(b, 8, monkeypatch) == []
    llama._layer_fn.cache_clear()
