"""How the Hopper launches (``hopper.py``) show tensors to the copy engine: its alignment rules, the
``TensorDescriptor``s they build on every call, and the views of biases and packed tensors those describe. The
general launches (``launch.py``) use the same rules for their tensor descriptors and bias rows.

Kept apart from the launches' planning so that the rules the descriptors rely on (16-byte aligned bases and strides,
unit last stride, broadcast dims of size 1) sit beside the one place that builds descriptors without checking them.
"""

from __future__ import annotations

import dataclasses

import torch

try:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except Exception:  # a Triton without Gluon's Hopper module (hopper.unsupported says so)
    TensorDescriptor = None


def tma_aligned(t: torch.Tensor) -> bool:
    """The copy engine's rules: unit last stride, 16-byte aligned base and strides (also launch.py's). Runs on
    every call for each input: written for host time (no generator)."""
    *outer, last = t.stride()
    if last != 1 or t.data_ptr() % 16:
        return False
    size = t.element_size()
    for st in outer:
        if (st * size) % 16:
            return False
    return True


def _unchecked_descriptors() -> bool:
    """Whether ``descriptor`` may build a ``TensorDescriptor`` without its ``__post_init__``: a plain dataclass
    whose fields are the ones set there (else every descriptor is built, and checked, by the constructor)."""
    if TensorDescriptor is None or not dataclasses.is_dataclass(TensorDescriptor):
        return False
    fields = dataclasses.fields(TensorDescriptor)
    names = {f.name for f in fields}
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    return "__slots__" not in vars(TensorDescriptor) and required == {"base", "shape", "strides", "block_shape",
                                                                      "layout"} <= names


_UNCHECKED = _unchecked_descriptors()
_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING} if _UNCHECKED else {}


def descriptor(base: torch.Tensor, shape, strides, block_shape, layout) -> "TensorDescriptor":
    """``TensorDescriptor(base, shape, strides, block_shape, layout)`` without the constructor's checks (16-byte
    aligned base and strides, unit last stride, positive sizes): ``hopper.unsupported`` and the views here have
    made them for every tensor the launches describe (tests/test_host_path.py rebuilds each launch's descriptors
    through the constructor). The checks were ~5 us of host time per descriptor on the H200 machine's CPU, and a
    training step builds twelve."""
    if not _UNCHECKED:
        return TensorDescriptor(base, shape, strides, block_shape, layout)
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS, base=base, shape=shape, strides=strides, block_shape=block_shape,
                         layout=layout)
    return desc


def bias_dims_on(bias: torch.Tensor) -> tuple[int, int]:
    """(b_on, h_on): 1 where the (B|1, H|1, 1, S_k) bias varies over batch / heads, 0 where it broadcasts
    (size 1 or stride 0); the kernels index it with ``b * b_on``, ``h * h_on``."""
    return int(bias.shape[0] > 1 and bias.stride(0) != 0), int(bias.shape[1] > 1 and bias.stride(1) != 0)


def aligned_row(n: int, elem: int) -> int:
    """Elements in the shortest 16-byte multiple that holds ``n`` of ``elem`` bytes: a stride the copy engine
    accepts for a dim of size 1, or a row padded for it."""
    return -(-n * elem // 16) * 16 // elem


def bias_row_view(bias: torch.Tensor):
    """``(shape, strides, b_on, h_on)`` of a (B|1, H|1, 1, S_k) bias seen as (B', H', S_k) for the copy
    engine: a broadcast batch/head dim (size 1 or stride 0) becomes size 1 with a stride the engine
    accepts, and its coordinate 0 (``b_on``/``h_on`` = 0). None where the engine cannot read it."""
    n_b, n_h, _, s_k = bias.shape
    elem = bias.element_size()
    if (s_k > 1 and bias.stride(3) != 1) or bias.data_ptr() % 16:
        return None
    b_on, h_on = bias_dims_on(bias)
    row = aligned_row(s_k, elem)
    stride_h = bias.stride(1) if h_on else row
    stride_b = bias.stride(0) if b_on else stride_h * (n_h if h_on else 1)
    if (stride_h * elem) % 16 or (stride_b * elem) % 16:
        return None
    return [n_b if b_on else 1, n_h if h_on else 1, s_k], [stride_b, stride_h, 1], b_on, h_on


def bias_matrix_view(bias: torch.Tensor):
    """``(shape, strides, b_mult, h_mult)`` of a (B|1, H|1, S_q, S_k) bias seen as (B' * H', S_q, S_k) for the
    copy engine, (batch b, head h) at row ``b * b_mult + h * h_mult`` (0 where it broadcasts). None where the
    engine cannot read it: the last stride not 1, the base or a stride not 16-byte aligned, a row expanded over
    the queries (stride 0: the general kernels read it), or batch and heads that do not flatten into one axis
    (batch stride != H * head stride)."""
    n_b, n_h, s_q, s_k = bias.shape
    elem = bias.element_size()
    b_on, h_on = bias_dims_on(bias)
    stride_q = bias.stride(2) if s_q > 1 else aligned_row(s_k, elem)
    if (s_k > 1 and bias.stride(3) != 1) or bias.data_ptr() % 16 or (stride_q * elem) % 16 or stride_q == 0:
        return None
    if b_on and h_on:
        if bias.stride(0) != n_h * bias.stride(1):
            return None
        rows, stride_row, mults = n_b * n_h, bias.stride(1), (n_h, 1)
    elif b_on or h_on:
        dim = 0 if b_on else 1
        rows, stride_row, mults = bias.shape[dim], bias.stride(dim), (int(b_on), int(h_on))
    else:
        rows, stride_row, mults = 1, stride_q * s_q, (0, 0)
    if (stride_row * elem) % 16:
        return None
    return [rows, s_q, s_k], [stride_row, stride_q, 1], *mults


def slope_args(slopes, dummy):
    """(pointer, (batch stride, head stride)) for (H,) or (B, H) slopes; a never-read dummy without."""
    if slopes is None:
        return dummy, (0, 0)
    return slopes, ((0, slopes.stride(0)) if slopes.dim() == 1 else slopes.stride())


def rows_view(x: torch.Tensor, packed: bool):
    """``(shape, strides)`` lists of a (B, S, H, D) tensor for its copy-engine descriptor, or of a packed (T, H, D) one
    as the batch row (1, T, H, D) (``x.unsqueeze(0)``'s: no view made per call, the descriptor takes ``x`` as base)."""
    if not packed:
        return list(x.shape), list(x.stride())
    return [1, *x.shape], [x.shape[0] * x.stride(0), *x.stride()]
