"""attention_backend: platform / compute capability -> implementation name."""

import pytest

from jaxserve.pallas_kernels import attention_backend, device_attention_backend
from jaxserve.pallas_kernels import select


@pytest.mark.parametrize("platform,cap,want", [
    ("cpu", None, "xla"),
    ("tpu", None, "xla"),
    ("gpu", (9, 0), "pallas_triton"),
    ("cuda", (9, 0), "pallas_triton"),
    ("gpu", (8, 0), "pallas_triton"),
    ("gpu", (8, 9), "pallas_triton"),
    ("gpu", (7, 5), "xla"),
    ("gpu", (10, 0), "xla"),
    ("gpu", None, "xla"),
])
def test_auto(platform, cap, want):
    assert attention_backend(platform, cap) == want
    assert attention_backend(platform, cap, "auto") == want


def test_hopper_prefers_mosaic_when_built(monkeypatch):
    monkeypatch.setattr(select, "MOSAIC_AVAILABLE", True)
    assert attention_backend("gpu", (9, 0)) == "pallas_mosaic"
    assert attention_backend("gpu", (8, 0)) == "pallas_triton"


def test_override():
    assert attention_backend("gpu", (9, 0), "xla") == "xla"
    assert attention_backend("cpu", None, "xla") == "xla"
    assert attention_backend("gpu", (8, 0), "pallas_triton") == "pallas_triton"
    with pytest.raises(ValueError, match="unknown"):
        attention_backend("gpu", (9, 0), "flash")
    with pytest.raises(ValueError, match="GPU"):
        attention_backend("cpu", None, "pallas_triton")
    with pytest.raises(ValueError, match="Hopper"):
        attention_backend("gpu", (9, 0), "pallas_mosaic")  # not built yet


def test_device_backend_on_this_host():
    assert device_attention_backend() in ("xla", "pallas_triton")
