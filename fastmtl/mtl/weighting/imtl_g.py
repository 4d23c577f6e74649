"""Impartial multi-task learning, gradient part."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting.base import GradientWeighting, masked_gram, register


@register("imtl_g")
class IMTLG(GradientWeighting):
    """IMTL-G of Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021.

    The update ``d = sum_t a_t g_t`` with ``sum_t a_t = 1`` has equal projections on every task's unit gradient
    ``u_t = g_t / |g_t|``: ``d . u_1 = d . u_t`` for all ``t``. With ``D = [g_1 - g_t]`` and ``U = [u_1 - u_t]``
    (``t = 2..K``), ``a_{2:K} = g_1 U^T (D U^T)^{-1}`` and ``a_1 = 1 - sum a_{2:K}``; every product is read off
    the Gramian, so the solve is ``(K-1) x (K-1)`` on the device.
    """

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """The closed-form IMTL-G coefficients ``a`` of the ``active`` tasks (0 for the others).

        A zero gradient has no unit vector (its equal-projection condition would force ``d = 0``), so inactive
        tasks are dropped from the conditions; the first active task serves as ``g_1``.
        """
        k = gram.shape[0]
        if k == 1:
            return torch.ones(1, dtype=gram.dtype, device=gram.device)
        if active is None:
            active = torch.ones(k, dtype=torch.bool, device=gram.device)
        order = torch.argsort((~active).to(torch.int8), stable=True)  # active tasks first, in their order
        gram = masked_gram(gram, active).index_select(0, order).index_select(1, order)
        active = active.index_select(0, order)
        a = _imtl_g_coefficients(gram, active)
        return torch.empty_like(a).scatter_(0, order, a)


def _imtl_g_coefficients(gram: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """IMTL-G's ``a`` with ``g_1`` (task 0) as the reference; the inactive tasks' conditions become ``a_b = 0``."""
    k = gram.shape[0]
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(gram.dtype).tiny)
    unit_dots = gram / norms[None, :]  # [i, j] = g_i . u_j
    # g_a . (u_1 - u_b) for a in {1} u rest, b in rest
    diff_u = unit_dots[:, :1] - unit_dots[:, 1:]  # [K, K-1]
    rhs = diff_u[0]  # g_1 U^T
    system = diff_u[:1] - diff_u[1:]  # (g_1 - g_a) . (u_1 - u_b): D U^T, [K-1, K-1]
    ridge = 1e-12 * system.abs().amax().clamp_min(1e-30)
    eye = torch.eye(k - 1, dtype=gram.dtype, device=gram.device)
    equations = (system + ridge * eye).T  # row b: the condition d . u_1 = d . u_b
    rest_active = active[1:]
    equations = torch.where(rest_active[:, None], equations, eye)
    rhs = torch.where(rest_active, rhs, 0.0)
    rest, _ = torch.linalg.solve_ex(equations, rhs[:, None])
    rest = rest[:, 0]
    return torch.cat([(1 - rest.sum())[None], rest])
