"""Multi-task learning as a bargaining game."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting.base import GradientWeighting, register


def nash_weights(gram: torch.Tensor, steps: int = 20) -> torch.Tensor:
    """The positive ``a`` with ``M a = 1 / a`` for a (normalised) Gramian ``M``, by damped Newton on the device.

    ``a`` minimises the strictly convex ``f(a) = a^T M a / 2 - sum_i log a_i`` (a tiny ridge makes ``M``
    positive definite), whose stationarity condition is the bargaining solution's ``M a = 1 / a``. ``f`` is
    self-concordant, so the damped Newton step ``a += delta / (1 + lambda)`` (``lambda`` the Newton decrement)
    stays positive and converges quadratically after a few damped steps; a fixed number of steps keeps the host
    out of the loop.
    """
    k = gram.shape[0]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    gram = gram + (gram.diagonal().mean().clamp_min(0) * 1e-10 + 1e-30) * eye
    a = gram.diagonal().clamp_min(1e-30).rsqrt()  # exact when the gradients are orthogonal
    for _ in range(steps):
        gradient = gram @ a - 1 / a
        hessian = gram + torch.diag_embed(1 / a**2)
        delta, _ = torch.linalg.solve_ex(hessian, -gradient[:, None])
        delta = delta[:, 0]
        decrement = (-(gradient @ delta)).clamp_min(0).sqrt()
        a = (a + delta / (1 + decrement)).clamp_min(1e-30)
    return a


@register("nash_mtl")
class NashMTL(GradientWeighting):
    """Nash-MTL of Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022 (arXiv:2202.01017).

    The update ``d = sum_i a_i g_i`` is the Nash bargaining solution: ``a > 0`` with ``M a = 1 / a`` for the
    Gramian ``M`` normalised by its Frobenius norm (as in the paper's code), so every task gets an equal share of
    "utility" ``g_i . d = 1 / a_i``. Solved on the device by damped Newton (:func:`nash_weights`), no cvxpy.
    Head gradients are scaled by ``a`` by default, as back-propagating ``sum_i a_i L_i`` would.

    Args:
        task_names: the tasks.
        steps: Newton steps (20).
        update_every: recompute ``a`` every this many steps and reuse it in between (1).
        max_norm: when positive, the update's norm is clipped to it (0: off).
        mode, scale_heads: see :class:`GradientWeighting`.
    """

    default_scale_heads = True

    def __init__(self, task_names, *, steps: int = 20, update_every: int = 1, max_norm: float = 0.0, **options):
        super().__init__(task_names, **options)
        steps, update_every, max_norm = int(steps), int(update_every), float(max_norm)
        if steps < 1 or update_every < 1:
            raise ValueError(f"steps and update_every must be positive, got {steps} and {update_every}")
        self.steps, self.update_every, self.max_norm = int(steps), int(update_every), float(max_norm)
        self.calls = 0
        self.register_buffer("alpha", torch.ones(len(self.task_names), dtype=torch.float64))

    def compute_weights(self, gram, losses):
        """The bargaining weights ``a`` (recomputed every ``update_every`` calls), norm-clipped if asked."""
        if self.calls % self.update_every == 0:
            normalised = gram / torch.linalg.matrix_norm(gram).clamp_min(1e-30)
            with torch.no_grad():
                self.alpha.copy_(nash_weights(normalised, self.steps).to(self.alpha.dtype))
        self.calls += 1
        a = self.alpha.to(gram.dtype)
        if self.max_norm > 0:
            norm = (a @ gram @ a).clamp_min(0).sqrt()
            a = a * (self.max_norm / norm.clamp_min(1e-30)).clamp_max(1)
        return a

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = int(state["calls"])
