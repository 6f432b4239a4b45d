"""Device facts the API and the backends both ask for (torch only, no backend imports)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def sm_major(device_index: int) -> int:
    """The GPU's compute-capability major, asked once per device (the query costs ~10 us of host time).
    A CUDA tensor's ``device.index`` is always set."""
    return torch.cuda.get_device_capability(device_index)[0]


@functools.cache
def sm_count(device_index: int) -> int:
    """The GPU's streaming multiprocessors, asked once per device (persistent kernels size their grid by it)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
