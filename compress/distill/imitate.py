"""Feature imitation through a 1x1 adapter fitted by least squares (FitNets, Romero et al. 2015; masked to the
objects' cells it is Wang et al. 2019's fine-grained imitation).

A pruned or narrower student has fewer channels than its teacher, so its features are compared with the
teacher's through a 1x1 convolution (a linear map of channels, with bias). FitNets learn that adapter with the
student; here it is instead *fitted in closed form*: the adapter is the least-squares regression of the teacher's
channels on the student's, computed from running (exponential moving average) first and second moments of the
paired features. It is therefore always the best adapter for the student as it is now, has no parameters for the
optimizer (nothing to add to checkpoints or to synchronise under DDP beyond the moments), and the loss

    || t - (W s + b) ||^2 / || t - mean(t) ||^2     (the share of the teacher's feature variance the student
                                                    cannot reproduce linearly, in [0, 1] at the fit)

pushes the student to carry the teacher's information, in any basis. The adapter is held fixed within a step
(detached): at the least-squares optimum the loss's gradient through W vanishes anyway.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from compress.train.distributed import group_size

__all__ = ["LstsqAdapter", "cells"]


def cells(f: Tensor, mask: Tensor | None = None) -> Tensor:
    """(N, C, H, W) -> (M, C) feature vectors of the cells (all, or where `mask` (N, H, W) is non-zero)."""
    x = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    return x if mask is None else x[mask.reshape(-1) > 0]


class LstsqAdapter:
    """Running least-squares 1x1 adapter from student to teacher channels, and the imitation loss through it.

    Args:
        momentum: weight of the past in the moving averages of the moments (0: this batch only).
        ridge: Tikhonov term, relative to the mean student variance (keeps the solve well-posed when a batch has
            fewer cells than channels or channels are dead).
    """

    def __init__(self, momentum: float = 0.9, ridge: float = 1e-3) -> None:
        self.momentum, self.ridge = momentum, ridge
        self.moments: dict[str, Tensor] | None = None  # float64: mean s, mean t, mean s s^T, mean s t^T

    def update(self, s: Tensor, t: Tensor) -> None:
        """Fold one batch's cells (M, Cs), (M, Ct) into the moving moments (pooled over the processes of a
        running process group, so every rank fits the same adapter)."""
        s, t = s.detach().double(), t.detach().double()
        sums = {"n": s.new_tensor([float(s.shape[0])]), "s": s.sum(0), "t": t.sum(0), "ss": s.T @ s, "st": s.T @ t}
        if group_size() > 1:
            flat = torch.cat([v.reshape(-1) for v in sums.values()])
            dist.all_reduce(flat)
            parts = torch.split(flat, [v.numel() for v in sums.values()])
            sums = {k: p.reshape(v.shape) for (k, v), p in zip(sums.items(), parts)}
        n = float(sums.pop("n"))
        if n == 0:
            return
        batch = {k: v / n for k, v in sums.items()}
        if self.moments is None or any(self.moments[k].shape != v.shape for k, v in batch.items()):
            self.moments = batch
        else:
            a = self.momentum
            self.moments = {k: a * self.moments[k].to(v.device) + (1 - a) * v for k, v in batch.items()}

    def solve(self) -> tuple[Tensor, Tensor]:
        """(W (Cs, Ct), b (Ct,)) minimising the expected ||t - s W - b||^2 under the moving moments."""
        m = self.moments
        cov_ss = m["ss"] - torch.outer(m["s"], m["s"])
        cov_st = m["st"] - torch.outer(m["s"], m["t"])
        lam = self.ridge * cov_ss.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(cov_ss.shape[0], dtype=cov_ss.dtype, device=cov_ss.device)
        w = torch.linalg.solve(cov_ss + lam * eye, cov_st)
        return w, m["t"] - m["s"] @ w

    def loss(self, f_s: Tensor, f_t: Tensor, mask: Tensor | None = None, update: bool = True) -> Tensor:
        """Unexplained share of the teacher's feature variance over the (masked) cells of this batch."""
        if f_s.shape[-2:] != f_t.shape[-2:]:
            raise ValueError(f"paired features differ in size: student {tuple(f_s.shape)} vs teacher "
                             f"{tuple(f_t.shape)}")
        s, t = cells(f_s, mask), cells(f_t, mask).detach()
        if update:
            self.update(s, t)
        if s.shape[0] == 0 or self.moments is None:
            return f_s.sum() * 0.0  # no cell to imitate (e.g. no object in the batch): keeps the graph
        w, b = self.solve()
        w, b = w.to(s.dtype), b.to(s.dtype)
        resid = t - (s @ w + b)
        return resid.pow(2).sum() / (t - t.mean(0)).pow(2).sum().clamp_min(1e-12)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "ridge": self.ridge,
                "moments": None if self.moments is None else {k: v.cpu() for k, v in self.moments.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.ridge = float(state["momentum"]), float(state["ridge"])
        self.moments = None if state["moments"] is None else {k: v.double() for k, v in state["moments"].items()}
