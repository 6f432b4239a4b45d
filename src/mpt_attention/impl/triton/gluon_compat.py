"""Gluon calls under whichever name the installed Triton gives them, and the one choice of code that its compiler
decides, so that one source of the Hopper kernels compiles on Triton 3.6 to 3.9 (``tools/compile_kernels.py``; 3.6
and 3.7 also run on the GPU machine) and runs well under each.

* ``partition_barrier``: a barrier over the calling partition's warps, ``gl.thread_barrier`` in Triton 3.6, renamed
  ``gl.barrier`` in 3.7.
* ``partition_arrive(bars, i)``: an arrival on mbarrier ``bars.index(i)`` once every warp of the partition has got
  there (the arrival itself is one thread's). Triton 3.8 on emits a partition barrier before every arrival
  (triton-lang/triton#10035, ``ARRIVE_SYNCS``), so ours before it would make two in a row: one per site and step in
  the dK/dV kernel's loops (benchmarks/NOTES.md session 56).
* ``smem_reinterpret(smem, dtype, shape, layout)``: ``smem._reinterpret`` up to 3.8, ``smem.reinterpret`` from 3.9.
* ``tma_load`` / ``tma_store``: the copy engine's (TMA) box copies, ``tma.async_copy_global_to_shared`` /
  ``tma.async_copy_shared_to_global`` in 3.6 and 3.7, renamed ``tma.async_load`` / ``tma.async_store`` in 3.8 (the old
  names kept as aliases there, removed in 3.9).
* ``KV_IN_STEP``: whether the dK/dV kernel forms its K and V operand descriptors in each step instead of once before
  its loop (``hopper_backward``'s ``zero``): Triton 3.7 on, whose compiled loop otherwise spills them (12% slower);
  under 3.6 the kernel is 0.6-1% faster with them formed once (benchmarks/NOTES.md session 54).
* ``wait_prior_grid``: ``griddepcontrol.wait`` as inline assembly (Triton's own ``gdc_wait`` is for its language, not
  Gluon's), so that one source serves every version.
"""

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from mpt_attention.impl.device import release

__all__ = ["ARRIVE_SYNCS", "KV_IN_STEP", "partition_arrive", "partition_barrier", "smem_reinterpret",
           "tma_load", "tma_store", "wait_prior_grid"]

partition_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
KV_IN_STEP = release(triton.__version__) >= (3, 7)
ARRIVE_SYNCS = release(triton.__version__) >= (3, 8)
_ARRIVE_SYNCS = gl.constexpr(ARRIVE_SYNCS)


@gluon.jit
def partition_arrive(bars, i=None):
    """Arrive on mbarrier ``bars.index(i)`` (``bars`` itself without ``i``) once every warp of the calling partition
    has got here (stored its part of a tile, finished its reads). The view is taken after the barrier, as the
    kernels did before this helper (the same code under Triton 3.6 and 3.7)."""
    if not _ARRIVE_SYNCS:
        partition_barrier()
    if i is None:
        mbarrier.arrive(bars)
    else:
        mbarrier.arrive(bars.index(i))


@builtin
def smem_reinterpret(smem, dtype, shape, layout, _semantic=None):
    """A view of shared memory ``smem`` as ``dtype``, ``shape`` and ``layout``."""
    view = getattr(smem, "reinterpret", None) or smem._reinterpret
    return view(dtype, shape, layout, _semantic=_semantic)


@gluon.jit
def wait_prior_grid():
    """``griddepcontrol.wait``: block until the kernel launched before this one (launched as its programmatic
    dependent, ``launch_pdl``) has finished and its writes are visible. A no-op in a kernel launched normally."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
