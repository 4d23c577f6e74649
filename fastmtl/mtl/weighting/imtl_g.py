"""Impartial multi-task learning, gradient part."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting.base import GradientWeighting, register


@register("imtl_g")
class IMTLG(GradientWeighting):
    """IMTL-G of Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021.

    The update ``d = sum_t a_t g_t`` with ``sum_t a_t = 1`` has equal projections on every task's unit gradient
    ``u_t = g_t / |g_t|``: ``d . u_1 = d . u_t`` for all ``t``. With ``D = [g_1 - g_t]`` and ``U = [u_1 - u_t]``
    (``t = 2..K``), ``a_{2:K} = g_1 U^T (D U^T)^{-1}`` and ``a_1 = 1 - sum a_{2:K}``; every product is read off
    the Gramian, so the solve is ``(K-1) x (K-1)`` on the device.
    """

    def compute_weights(self, gram, losses):
        """The closed-form IMTL-G coefficients ``a``."""
        k = gram.shape[0]
        if k == 1:
            return torch.ones(1, dtype=gram.dtype, device=gram.device)
        norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(gram.dtype).tiny)
        unit_dots = gram / norms[None, :]  # [i, j] = g_i . u_j
        # g_a . (u_1 - u_b) for a in {1} u rest, b in rest
        diff_u = unit_dots[:, :1] - unit_dots[:, 1:]  # [K, K-1]
        rhs = diff_u[0]  # g_1 U^T
        system = diff_u[:1] - diff_u[1:]  # (g_1 - g_a) . (u_1 - u_b): D U^T, [K-1, K-1]
        ridge = 1e-12 * system.abs().amax().clamp_min(1e-30)
        eye = torch.eye(k - 1, dtype=gram.dtype, device=gram.device)
        rest, _ = torch.linalg.solve_ex((system + ridge * eye).T, rhs[:, None])
        rest = rest[:, 0]
        return torch.cat([(1 - rest.sum())[None], rest])
