"""Test setup: Triton's CPU interpreter when there is no GPU, NaN-poisoned allocations, seeds."""

import inspect
import os
import sys

import pytest
import torch

# Must happen before any kernel module is imported: Triton reads it when @triton.jit decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_real_empty, _real_empty_like = torch.empty, torch.empty_like
_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def pytest_collection_modifyitems(config, items):
    """Tests marked ``hopper`` (the Gluon kernels' own) are skipped without an sm_90 GPU."""
    if _SM90:
        return
    skip = pytest.mark.skip(reason="needs an sm_90 (Hopper) GPU")
    for item in items:
        if item.get_closest_marker("hopper") is not None:
            item.add_marker(skip)


def _poison(out):
    """NaN in float tensors, a large negative in integer ones (never a valid count, index or zero)."""
    if out.is_floating_point():
        return out.fill_(float("nan"))
    if out.dtype in (torch.int32, torch.int64):
        return out.fill_(-(2**30) - 7)
    return out


def _poisoned_empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every float or int32/int64 tensor our code allocates with empty/empty_like starts poisoned: unwritten outputs
    fail."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def fresh_launch_plans():
    """Each test plans its own launches (``impl.triton.plans``): a plan kept from another test would hold what that
    test patched (an SM count, a switch)."""
    plans = sys.modules.get("mpt_attention.impl.triton.plans")
    if plans is not None:
        plans.KEPT.clear()
    yield


@pytest.fixture
def hopper_route_on_cpu(monkeypatch):
    """The Hopper kernels' route taken for CPU tensors (an SM count of 4): every other reason of
    ``hopper.unsupported`` still applies. For host-side tests that record the launches instead of running them.
    Returns a list that grows by one entry per ``hopper.unsupported`` call."""
    from mpt_attention.impl.triton import hopper

    real, checks = hopper.unsupported, []

    def unsupported(*args, **kwargs):
        checks.append(1)
        reason = real(*args, **kwargs)
        return None if reason == "not an sm_90 GPU" else reason

    monkeypatch.setattr(hopper, "unsupported", unsupported)
    monkeypatch.setattr(hopper, "sm_count", lambda device_index: 4)
    return checks


@pytest.fixture
def dq_gemm_calls(monkeypatch):
    """One entry per call of the Triton backend's dQ GEMM on a stored dS (``launch_backward._dq_from_ds``) during
    the test; each call still runs."""
    from mpt_attention.impl.triton import launch_backward

    calls, real = [], launch_backward._dq_from_ds
    monkeypatch.setattr(launch_backward, "_dq_from_ds", lambda *args: (calls.append(1), real(*args))[1])
    return calls


@pytest.fixture
def hopper_dkdv_launches(monkeypatch):
    """One ``(bias matrix read, dQ warpgroup, dbias stored)`` entry per launch of the Hopper dK/dV kernel
    (``hopper_dkdv.backward_dkdv``) during the test; each launch still runs."""
    from mpt_attention.impl.triton import hopper_dkdv

    calls, real = [], hopper_dkdv.run_dkdv

    def record(*args, **kwargs):
        call = inspect.signature(real).bind(*args, **kwargs)
        call.apply_defaults()
        bias, dq_acc, dbias = (call.arguments[name] for name in ("bias", "dq_acc", "dbias"))
        calls.append((bias is not None and bias.shape[2] != 1, dq_acc is not None, dbias is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(hopper_dkdv, "run_dkdv", record)
    return calls


@pytest.fixture
def hopper_forward_bias_shapes(monkeypatch):
    """The bias shape (None without one) of each launch of the Hopper forward (``hopper.forward``) during the
    test; each launch still runs."""
    from mpt_attention.impl.triton import hopper

    calls, real = [], hopper.run_forward

    def record(*args, **kwargs):
        calls.append(None if args[4] is None else tuple(args[4].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(hopper, "run_forward", record)
    return calls


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"torch {torch.__version__}, cuda={torch.cuda.is_available()}, TRITON_INTERPRET={interp}"
