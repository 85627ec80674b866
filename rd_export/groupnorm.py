"""GroupNorm traced as reductions, for the graphs where onnxruntime's CPU runs that form faster.

torch exports ``nn.GroupNorm`` as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add.
onnxruntime's InstanceNormalization is not part of its NCHWc layout, so on a whole frame each
GroupNorm also costs a reorder out of and back into the convolutions' blocked layout, and the
kernel itself is slow on large instances. :class:`ReducedGroupNorm` computes the same function
from two ReduceMean reductions (mean and mean of squares per group) and one per-channel affine
``x * a + b``, which onnxruntime runs faster on large frames (docs/export.md has the
measurements; on the 64-px tiles of the step graph the two forms cost the same, so only the
prologue is exported this way).

x is read once, by the Reshape to its groups (and by a Shape for the way back): everything else
reads that grouped view. In an INT8 graph every reader of a dequantized tensor gets its own
DequantizeLinear from onnxruntime, so each extra reader of x would cost a full-frame pass there.

The statistics are computed in a child module named :data:`STATS_SCOPE`, so every node of them is
named ``.../groupnorm_stats/...`` in the ONNX graph: ``rd_export.graph.island_nodes`` selects them
by that name and the FP16 derivation keeps them FP32 (a mean of squares rounded to FP16 would lose
the variance to cancellation), as it keeps InstanceNormalization FP32 in the torch form.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["STATS_SCOPE", "GroupNormStats", "ReducedGroupNorm", "reduced_groupnorm"]

#: the child module's name, hence the ONNX name scope of the statistics' nodes
STATS_SCOPE = "groupnorm_stats"


class GroupNormStats(nn.Module):
    """Per-(sample, group) mean and 1 / sqrt(var + eps) of x grouped as [N, G, C/G*H*W], each [N, G, 1]."""

    def __init__(self, groups: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = int(groups), float(eps)

    def forward(self, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = xg.mean(-1, keepdim=True)
        var = ((xg * xg).mean(-1, keepdim=True) - mean * mean).clamp(min=0.0)
        return mean, torch.rsqrt(var + self.eps)


class ReducedGroupNorm(nn.Module):
    """The function of an ``nn.GroupNorm`` (affine), as statistics + one per-channel affine."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        if not norm.affine:
            raise ValueError("ReducedGroupNorm needs an affine GroupNorm")
        self.groups, self.channels = norm.num_groups, norm.num_channels
        self.weight, self.bias = norm.weight, norm.bias
        setattr(self, STATS_SCOPE, GroupNormStats(norm.num_groups, norm.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg = x.reshape(x.shape[0], self.groups, -1)  # x's one reader (and its shape): the module docstring
        mean, rstd = getattr(self, STATS_SCOPE)(xg)
        a = self.weight.reshape(1, self.groups, -1) * rstd  # [N, G, C/G]
        b = self.bias.reshape(1, self.groups, -1) - mean * a
        xc = xg.reshape(xg.shape[0], self.groups, self.channels // self.groups, -1)  # [N, G, C/G, H*W]
        return (xc * a.unsqueeze(-1) + b.unsqueeze(-1)).reshape(x.shape)


def reduced_groupnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``nn.GroupNorm`` replaced by a :class:`ReducedGroupNorm`
    (same parameters, same function); ``module`` itself is left unchanged."""
    module = copy.deepcopy(module)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, ReducedGroupNorm(child))
            else:
                swap(child)

    if isinstance(module, nn.GroupNorm):
        return ReducedGroupNorm(module)
    swap(module)
    return module
