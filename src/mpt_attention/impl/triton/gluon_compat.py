"""Gluon calls under whichever name the installed Triton gives them, so that one source of the Hopper kernels
compiles on Triton 3.6 to 3.9 (``tools/compile_kernels.py``; 3.6 and 3.7 also run on the GPU machine).

* ``partition_barrier``: a barrier over the calling partition's warps, ``gl.thread_barrier`` in Triton 3.6, renamed
  ``gl.barrier`` in 3.7.
* ``smem_reinterpret(smem, dtype, shape, layout)``: ``smem._reinterpret`` up to 3.8, ``smem.reinterpret`` from 3.9.
* ``tma_load`` / ``tma_store``: the copy engine's (TMA) box copies, ``tma.async_copy_global_to_shared`` /
  ``tma.async_copy_shared_to_global`` in 3.6 and 3.7, renamed ``tma.async_load`` / ``tma.async_store`` in 3.8 (the old
  names kept as aliases there, removed in 3.9).
"""

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import tma

__all__ = ["partition_barrier", "smem_reinterpret", "tma_load", "tma_store"]

partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@builtin
def smem_reinterpret(smem, dtype, shape, layout, _semantic=None):
    """A view of shared memory ``smem`` as ``dtype``, ``shape`` and ``layout``."""
    view = getattr(smem, "reinterpret", None) or smem._reinterpret
    return view(dtype, shape, layout, _semantic=_semantic)
