"""Writing new tokens' K/V into the paged cache with a hand-written Triton kernel, called through jax-triton.

Design note. The same write as kv_write.py (T * Hkv rows of D elements scattered to their cache slots, no
reuse), measured against XLA's scatter and the Pallas version on the same job (scripts/bench_kernels.py
--kv-write). It won from 2048 tokens on the H100, so the engine uses it there (select.kv_write_backend).

Grid (cdiv(T, BLOCK_T), Hkv): a program moves a [BLOCK_T, D] tile of K and one of V for one kv head. Its
loads are BLOCK_T rows of D contiguous elements, Hkv * D apart in k_new/v_new; its stores are D contiguous
elements at each token's slot in that head's pool. D is a compile-time constant and jax-triton tells Triton
every array is 16-byte aligned, so loads and stores are 16-byte vectors. BLOCK_T is picked so that there are
at least ~512 programs (about 4 per SM on an H100's 132) and each thread moves 8 elements (16 B of bf16);
callers may pin it (block_tokens) to sweep it.

triton_call passes one pointer per output after the inputs. The cache inputs are aliased to the outputs
(input_output_aliases), so k_out/v_out point at the cache buffers: the kernel writes through them and never
reads k_in/v_in. With the cache donated the update is in place; without donation XLA copies it first.
Flat cache offsets are int64: (h * N * S + slot) * D passes 2**31 once one K cache holds 2**31 elements.
Padding tokens' slots lie in the null block 0; their writes race with each other harmlessly.

Measured on an H100 (bench_kernels.py --kv-write: Llama-3-8B layer, bf16, 32 writes per jitted call, us per
write): T=8192 29.6 (2.26 TB/s, 78% of copy) vs Pallas 43 and XLA 156; T=2048 10.5 vs 12.5 and 43.5; but at
T <= 256 10-16 vs Pallas 2.5-3.6 and XLA 3.6-5.7. That gap looks like launch cost, not this kernel: with XLA's
command buffers (CUDA graphs) switched off, Pallas too takes ~10-18 us there, which suggests that jax-triton's
custom call runs outside them (not confirmed with a profiler).

triton and jax_triton are optional: jax_triton imports only where jaxlib has GPU support, so it is imported
when the kernel is called, and this module imports (and triton_available() answers False) on CPU.
"""

from __future__ import annotations

import functools

import jax

from jaxserve.pallas_kernels.kv_write import _check

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU hosts: the kernel below is not defined, triton_available() is False
    triton = None

# Tokens per program the heuristic picks from (also the values scripts/bench_kernels.py sweeps).
BLOCK_TOKENS = (1, 4, 16, 64)
_MIN_PROGRAMS = 512  # ~4 programs per SM on an H100 (132 SMs)


@functools.cache
def triton_available() -> bool:
    """True when the default JAX backend is a GPU and triton and jax_triton import (never raises)."""
    if triton is None or jax.default_backend() != "gpu":
        return False
    try:
        import jax_triton  # noqa: F401  (raises ImportError with a CPU-only jaxlib)
    except ImportError:
        return False
    return True


if triton is not None:

    @triton.jit
    def _kv_write_kernel(
        slot_ptr,  # i32[T]
        k_new_ptr,  # [T, HKV, D]
        v_new_ptr,  # [T, HKV, D]
        k_in_ptr,  # [HKV, NUM_SLOTS, D]  aliased to k_out_ptr (unused: the write goes through the output)
        v_in_ptr,  # [HKV, NUM_SLOTS, D]  aliased to v_out_ptr
        k_out_ptr,  # [HKV, NUM_SLOTS, D]  the K cache, NUM_SLOTS = N * S
        v_out_ptr,  # [HKV, NUM_SLOTS, D]
        T: tl.constexpr,
        HKV: tl.constexpr,
        NUM_SLOTS: tl.constexpr,
        D: tl.constexpr,
        D_PAD: tl.constexpr,  # next power of 2 >= D (tl.arange needs one)
        BLOCK_T: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) token ids
        h = tl.program_id(1).to(tl.int64)  # kv head
        d = tl.arange(0, D_PAD)  # (D_PAD,)
        t_ok = t < T
        mask = t_ok[:, None] & (d[None, :] < D)  # (BLOCK_T, D_PAD)
        slot = tl.load(slot_ptr + t, mask=t_ok, other=0).to(tl.int64)  # (BLOCK_T,)
        src = (t.to(tl.int64)[:, None] * HKV + h) * D + d[None, :]  # (BLOCK_T, D_PAD) into [T, HKV, D]
        dst = (h * NUM_SLOTS + slot[:, None]) * D + d[None, :]  # (BLOCK_T, D_PAD) into [HKV, NUM_SLOTS, D]
        k = tl.load(k_new_ptr + src, mask=mask)
        v = tl.load(v_new_ptr + src, mask=mask)
        tl.store(k_out_ptr + dst, k.to(k_out_ptr.dtype.element_ty), mask=mask)
        tl.store(v_out_ptr + dst, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def launch_config(num_tokens: int, num_kv_heads: int, head_dim: int, block_tokens: int | None = None):
    """(tokens per program, warps): the largest BLOCK_TOKENS entry that still gives >= 512 programs (unless
    pinned), and warps so that each thread moves 8 elements, 1 to 8 of them."""
    if block_tokens is None:
        fits = [b for b in BLOCK_TOKENS if -(-num_tokens // b) * num_kv_heads >= _MIN_PROGRAMS]
        block_tokens = max(fits, default=BLOCK_TOKENS[0])
    elif block_tokens < 1 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of 2, got {block_tokens}")
    return block_tokens, max(1, min(8, block_tokens * _pow2_ceil(head_dim) // (32 * 8)))


@functools.partial(jax.jit, static_argnames=("block_tokens",), donate_argnums=(0, 1))
def kv_write_triton(k_pages, v_pages, k_new, v_new, slot_mapping, *, block_tokens: int | None = None):
    """Triton (jax-triton) version of kv_write. Donates and aliases the cache, so the write is in place.

    Args:
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim], any float dtype Triton stores
        (bf16, f16, f32).
      k_new, v_new: [num_tokens, num_kv_heads, head_dim], cast to the cache dtype.
      slot_mapping: i32[num_tokens], slot = block * block_size + offset; padding tokens -> block 0.
      block_tokens: tokens per program (a power of 2); None picks one from the shapes (launch_config).
    Returns:
      (k_pages, v_pages) with the new rows written.
    Raises:
      ValueError on mismatched shapes or a non-i32 slot_mapping; RuntimeError where triton_available() is False.
    """
    _check(k_pages, v_pages, k_new, v_new, slot_mapping)
    Hkv, N, S, D = k_pages.shape
    T = slot_mapping.shape[0]
    block_t, warps = launch_config(T, Hkv, D, block_tokens)
    if not triton_available():
        raise RuntimeError("kv_write_triton needs a GPU with triton and jax_triton installed (pip install "
                           "jaxserve[triton]); use kv_write elsewhere")
    import jax_triton as jt

    if T == 0:
        return k_pages, v_pages
    k_out, v_out = jt.triton_call(
        slot_mapping, k_new, v_new, k_pages, v_pages,
        kernel=_kv_write_kernel,
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        grid=(-(-T // block_t), Hkv),
        input_output_aliases={3: 0, 4: 1},  # array operand index -> output index: k_pages, v_pages
        num_warps=warps,
        num_stages=1,  # no loop to pipeline
        name="kv_write_triton",
        # constexprs (metaparams): no scalar operands, so the alias indices above count arrays only
        T=T, HKV=Hkv, NUM_SLOTS=N * S, D=D, D_PAD=_pow2_ceil(D), BLOCK_T=block_t,
    )
    return k_out, v_out
