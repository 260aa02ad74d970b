"""attention_backend: platform / compute capability -> implementation name."""

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
    with pytest.raises(ValueError, match="warpgroups"):
        attention.get_backend("pallas_mosaic", 3)


def test_decode_splits_only_for_small_fused_decode_steps():
    """Split-K partials (PallasBackend.splits) only where add_rms_norm sums them: decode steps of at most
    splits_max_tokens rows, fused small ops on, a hidden size the kernel takes; JAXSERVE_DECODE_SPLITS parses."""
    from jaxserve.attention import PallasBackend, XlaBackend, _env_splits
    b = PallasBackend(splits=(4, 8))
    assert b.decode_splits(8, 4096, True) == (4, 8)
    assert b.decode_splits(16, 4096, True) == (0, 0)  # larger steps: XLA's plain dots
    assert b.decode_splits(1, 4096, False) == (0, 0)  # prefill or mixed steps
    assert b.decode_splits(1, 576, True) == (0, 0)  # SmolLM2's hidden size: no fused norm to sum them
    assert PallasBackend(splits=(4, 8), fuse_small_ops=False).decode_splits(1, 4096, True) == (0, 0)
    assert XlaBackend().decode_splits(1, 4096, True) == (0, 0)
    assert _env_splits("4:8") == (4, 8) and _env_splits(None) == PallasBackend.splits
    for bad in ("4", "a:b", "-1:2"):
        with pytest.raises(ValueError, match="S_o:S_down"):
            _env_splits(bad)
