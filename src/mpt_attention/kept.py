"""Values derived from an input tensor, kept on the tensor object until the tensor changes (torch only).

A model hands one tensor to all its layers: MPT builds one ALiBi bias row per forward and passes it to every block, and
packed sequences share one ``cu_seqlens``. What a call derives from such a tensor (the bias row in the kernels' units,
the per-sequence tile counts, the lengths' statistics) is made on the first layer's call and kept as an attribute of
the tensor's base (the tensor itself unless it is a view), per view geometry, beside the storage's version counter:
MPT's attention functions slice the bias anew in every layer (``functional._seed_bias``), and each slice is a new
view of the same base. Every in-place write to the tensor, its base or any view of them bumps that counter, and the
next call makes the value again.

Not seen: writes the counter does not count (through ``.data``, or to memory the tensor shares with another one made
by ``from_dlpack`` or from its untyped storage). Nothing is kept for inference tensors (``torch.inference_mode`` gives
them no counter), and nothing made on the device while a CUDA graph is captured (a replay must recompute from what it
finds). A value made on the device is kept per stream: a call on another stream makes its own, so no stream reads
memory another has not finished writing.
"""

from __future__ import annotations

import torch


_MAX_KEPT = 8  # values per base tensor and name (view geometries x keys): a model uses a few sequence lengths


def kept_on(t: torch.Tensor, name: str, make, key=None, on_device: bool = False):
    """``make()``, kept on ``t``'s base as attribute ``name`` for ``t``'s view geometry and ``key``; made again when
    the storage's version differs. ``on_device``: ``make`` launches device work (its result lives on ``t``'s
    device): kept per stream."""
    if t.is_inference():
        return make()
    if on_device and t.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return make()
        key = (key, torch._C._cuda_getCurrentRawStream(t.device.index))
    owner = t if t._base is None else t._base  # a view's base is the root of its chain of views
    kept = getattr(owner, name, None)
    if kept is None or kept[0] != t._version or len(kept[1]) >= _MAX_KEPT:
        kept = (t._version, {})
        setattr(owner, name, kept)
    slot = (t.storage_offset(), t.shape, t.stride(), t.dtype, key)
    if slot not in kept[1]:
        kept[1][slot] = make()
    return kept[1][slot]


def kept_values(t: torch.Tensor, name: str) -> list:
    """What ``kept_on`` keeps under ``name`` on ``t``'s base now (every view geometry, key and stream; stale ones
    included until the next ``kept_on`` call sees the new version): for tests and debugging."""
    owner = t if t._base is None else t._base
    return list(getattr(owner, name, (None, {}))[1].values())
