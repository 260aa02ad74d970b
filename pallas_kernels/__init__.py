"""Paged attention kernels (Pallas, Triton lowering) and their pure-jnp references (the CPU/XLA path)."""

from jaxserve.pallas_kernels.kv_write import kv_write, kv_write_pallas
from jaxserve.pallas_kernels.paged_decode import paged_decode
from jaxserve.pallas_kernels.ragged_prefill import ragged_prefill
from jaxserve.pallas_kernels.reference import (kv_write_reference, paged_decode_reference,
                                               ragged_attention_reference)
from jaxserve.pallas_kernels.select import attention_backend, device_attention_backend
from jaxserve.pallas_kernels.tuning import DecodeTuning, PrefillTuning
