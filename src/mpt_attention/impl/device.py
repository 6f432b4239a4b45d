"""Device and package facts the API and the backends both ask for (torch only, no backend imports)."""

from __future__ import annotations

import functools
import re

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


def release(version: str) -> tuple[int, ...]:
    """``(major, minor)`` of a version string such as ``triton.__version__`` (``"3.7.1"``, ``"3.8.0+git1a2b3c"``)."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])
