"""MPT's low-precision LayerNorm, used by ``qk_ln`` with ``low_precision_layernorm=True``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LPLayerNorm"]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type not in ("cuda", "cpu"):
        raise NotImplementedError(f"LPLayerNorm under autocast supports cuda and cpu tensors, got {device.type}")
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


class LPLayerNorm(torch.nn.LayerNorm):
    """LayerNorm that, under autocast, runs in the autocast dtype (input, weight and bias downcast).

    Without autocast it is a plain LayerNorm. The output is low precision under autocast, which is
    the point: it saves the float32 round trip of ``nn.LayerNorm`` under AMP.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x.device)
        if dtype is None:
            return super().forward(x)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)
