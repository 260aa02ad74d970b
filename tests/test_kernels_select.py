"""attention_backend: platform / compute capability -> implementation name."""

import jax
import jax.numpy as jnp
import pytest

from jaxserve.pallas_kernels import attention_backend, device_attention_backend
from jaxserve.pallas_kernels import select


@pytest.mark.parametrize("platform,cap,want", [
    ("cpu", None, "xla"),
    ("tpu", None, "xla"),
    ("gpu", (9, 0), "pallas_mosaic"),  # measured faster in the engine on the H100 (select.MOSAIC_FASTEST)
    ("cuda", (9, 0), "pallas_mosaic"),
    ("gpu", (8, 0), "pallas_triton"),
    ("gpu", (8, 9), "pallas_triton"),
    ("gpu", (7, 5), "xla"),
    ("gpu", (10, 0), "xla"),
    ("gpu", None, "xla"),
])
def test_auto(platform, cap, want):
    assert attention_backend(platform, cap) == want
    assert attention_backend(platform, cap, "auto") == want


def test_hopper_takes_triton_when_mosaic_is_not_fastest(monkeypatch):
    monkeypatch.setattr(select, "MOSAIC_FASTEST", False)
    assert attention_backend("gpu", (9, 0)) == "pallas_triton"
    assert attention_backend("gpu", (8, 0)) == "pallas_triton"


def test_override():
    assert attention_backend("gpu", (9, 0), "xla") == "xla"
    assert attention_backend("cpu", None, "xla") == "xla"
    assert attention_backend("gpu", (8, 0), "pallas_triton") == "pallas_triton"
    with pytest.raises(ValueError, match="unknown"):
        attention_backend("gpu", (9, 0), "flash")
    with pytest.raises(ValueError, match="GPU"):
        attention_backend("cpu", None, "pallas_triton")
    assert attention_backend("gpu", (9, 0), "pallas_mosaic") == "pallas_mosaic"
    with pytest.raises(ValueError, match="Hopper"):
        attention_backend("gpu", (8, 0), "pallas_mosaic")


def test_device_backend_on_this_host():
    assert device_attention_backend() in ("xla", "pallas_triton", "pallas_mosaic")


def test_tuning_trims_pipeline_stages_to_fit_shared_memory():
    from jaxserve.pallas_kernels.tuning import DecodeTuning, PrefillTuning, fit_stages
    # f32, head dim 128, one 128-token page per step: 128 KiB of K+V per stage, so only one stage fits.
    assert fit_stages(2, 128, 128, 4) == 1
    assert fit_stages(2, 128, 128, 2) == 2  # bf16: 64 KiB per stage, two fit
    assert fit_stages(3, 16, 64, 2) == 3
    assert DecodeTuning(num_splits=1).resolve(2, 2, 4, 128, head_dim=128, itemsize=4).num_stages == 1
    assert PrefillTuning().resolve(8, 128, 4, 128, itemsize=4).num_stages == 1


def test_get_backend_prefill_warpgroups(monkeypatch):
    from jaxserve import attention
    monkeypatch.setattr(select, "device_attention_backend", lambda override=None: override or "pallas_mosaic")
    assert attention.get_backend("auto").prefill_warpgroups == select.MOSAIC_PREFILL_WARPGROUPS
    assert attention.get_backend("pallas_mosaic", 2).prefill_warpgroups == 2
    assert attention.get_backend("pallas_mosaic", 0).prefill_warpgroups == 0
    assert attention.get_backend("pallas_triton", 2).prefill_warpgroups == 0  # Triton throughout
    assert attention.get_backend("xla", 2).name == "xla"
    assert attention.get_backend("pallas_mosaic", 3).prefill_warpgroups == 3  # FA3's layout
    with pytest.raises(ValueError, match="warpgroups"):
        attention.get_backend("pallas_mosaic", 4)


def test_prefill_tuning_choices():
    from jaxserve.pallas_kernels.ragged_prefill_mgpu import FA3_MIN_TOKENS, FA3_TUNING, prefill_tuning
    assert prefill_tuning(1).warpgroups == 1 and not prefill_tuning(1).producer
    assert prefill_tuning(2).warpgroups == 2 and not prefill_tuning(2).producer
    assert prefill_tuning(3) == FA3_TUNING and FA3_TUNING.warpgroups == 2 and FA3_TUNING.producer
    assert prefill_tuning(3, FA3_MIN_TOKENS) == FA3_TUNING  # large steps: FA3's layout
    assert prefill_tuning(3, FA3_MIN_TOKENS - 1) == prefill_tuning(1)  # small steps: one warpgroup (warm start)


def test_prefill_tuning_falls_back_where_shared_memory_does_not_fit():
    from jaxserve.pallas_kernels.ragged_prefill_mgpu import FA3_TUNING, MosaicPrefillTuning, prefill_tuning
    pages = lambda d, s: jax.ShapeDtypeStruct((8, 64, s, d), jnp.bfloat16)  # noqa: E731
    # head dim 128: FA3's 128 keys in a 2-deep ring fit (64 KB of q rows + 128 KB of K/V)
    assert prefill_tuning(3, 4096, pages(128, 16)) == FA3_TUNING
    # head dim 256, 16-token blocks: one stage of 128 keys would not fit; 64 keys per step do
    assert FA3_TUNING.resolve(16, 256, 2).keys_per_step == 64 and FA3_TUNING.fits(16, 256, 2)
    assert prefill_tuning(3, 4096, pages(256, 16)) == FA3_TUNING
    # head dim 256, 128-token blocks: a step cannot drop below one block, so two warpgroups do not fit
    assert not FA3_TUNING.fits(128, 256, 2)
    assert prefill_tuning(3, 4096, pages(256, 128)) == MosaicPrefillTuning()
    assert MosaicPrefillTuning().fits(128, 256, 2)


def test_attend_picks_the_prefill_tuning_by_step_size(monkeypatch):
    """PallasBackend.attend hands the step's token count to prefill_tuning: FA3's layout from FA3_MIN_TOKENS on."""
    from jaxserve.attention import PallasBackend, dummy_metadata
    from jaxserve.pallas_kernels import ragged_prefill_mgpu as pmgpu
    seen = []
    monkeypatch.setattr(pmgpu, "ragged_prefill_mgpu", lambda q, *a, tuning, **k: seen.append(tuning) or q)
    backend = PallasBackend(name="pallas_mosaic", prefill_warpgroups=3)
    k = jnp.zeros((2, 4, 16, 64), jnp.bfloat16)
    for tokens in (pmgpu.FA3_MIN_TOKENS // 2, pmgpu.FA3_MIN_TOKENS):
        q = jnp.zeros((tokens, 4, 64), jnp.bfloat16)
        backend.attend(q, k, k, dummy_metadata(tokens, 2, 3), scale=0.125)
    assert seen == [pmgpu.MosaicPrefillTuning(), pmgpu.FA3_TUNING]


def test_mosaic_decode_tuning_persistent_from_min_items():
    """Decode steps of min_items (batch x kv heads) or more take the persistent kernel (one worker per SM); smaller
    ones and min_items 0 keep the grid kernel's default tuning."""
    from jaxserve.pallas_kernels.paged_decode_mgpu import DEFAULT_MOSAIC_DECODE
    from jaxserve.pallas_kernels.select import mosaic_decode_tuning
    assert mosaic_decode_tuning(32, 8, 256).workers == -1
    assert mosaic_decode_tuning(31, 8, 256) == DEFAULT_MOSAIC_DECODE and DEFAULT_MOSAIC_DECODE.workers == 0
    assert mosaic_decode_tuning(512, 8, 0) == DEFAULT_MOSAIC_DECODE


def test_persistent_threshold_env_switch(monkeypatch):
    """JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS sets the Mosaic backend's threshold; empty means the default, a
    non-integer is an error that names the variable, and 0 or a negative value means never."""
    from jaxserve import attention
    from jaxserve.pallas_kernels import select
    from jaxserve.pallas_kernels.paged_decode_mgpu import DEFAULT_MOSAIC_DECODE
    monkeypatch.setattr(select, "device_attention_backend", lambda override=None: "pallas_mosaic")
    for env, want in (("", select.MOSAIC_DECODE_PERSISTENT_MIN_ITEMS), ("64", 64), (" 0 ", 0), ("-1", -1)):
        monkeypatch.setenv("JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS", env)
        assert attention.get_backend("pallas_mosaic").decode_persistent_min_items == want
    monkeypatch.setenv("JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS", "off")
    with pytest.raises(ValueError, match="JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS must be an integer"):
        attention.get_backend("pallas_mosaic")
    monkeypatch.setattr(select, "device_attention_backend", lambda override=None: "pallas_triton")
    assert attention.get_backend("pallas_triton").name == "pallas_triton"  # the variable is the Mosaic path's only
    assert select.mosaic_decode_tuning(4096, 8, -1) == DEFAULT_MOSAIC_DECODE
