"""Multi-task learning as a bargaining game."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting.base import GradientWeighting, masked_gram, register


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


def _active_nash_weights(gram: torch.Tensor, active: torch.Tensor, steps: int) -> torch.Tensor:
    """:func:`nash_weights` of the active tasks' Gramian (normalised by its Frobenius norm); 0 for the others.

    The inactive tasks are replaced by orthogonal gradients with the active tasks' mean squared norm: they
    decouple from the rest (the Newton steps on the active block are those of the smaller problem, the ridge is
    the same) and start at their exact solution, so no shape depends on the data.
    """
    masked = masked_gram(gram, active)
    normalised = masked / torch.linalg.matrix_norm(masked).clamp_min(1e-30)
    diagonal = normalised.diagonal()
    filler = diagonal.sum() / active.sum().clamp_min(1).to(gram.dtype)
    filler = torch.where(filler > 0, filler, 1.0)
    normalised = normalised + torch.diag_embed(torch.where(active, 0.0, filler))
    return torch.where(active, nash_weights(normalised, steps), 0.0)


def _with_stand_ins(alpha: torch.Tensor, gram: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``alpha`` with a weight for each ``active`` task it does not cover (``alpha = 0``), without a solve.

    The stand-in is the mean of the covered tasks' weights; when no task is covered, the weights of orthogonal
    gradients with the active tasks' Gramian (normalised as in :func:`_active_nash_weights`), ``1 / sqrt(M_ii)``.
    """
    covered = alpha > 0
    mean = alpha.sum() / covered.sum().clamp_min(1).to(alpha.dtype)
    masked = masked_gram(gram, active)
    normalised = masked.diagonal() / torch.linalg.matrix_norm(masked).clamp_min(1e-30)
    orthogonal = normalised.clamp_min(1e-30).rsqrt()
    stand_in = torch.where(covered.any(), mean, orthogonal)
    return torch.where(active & ~covered, stand_in, alpha)


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
        update_every: solve for ``a`` every this many steps ("fresh" steps) and reuse the cached ``a`` in between
            (1: every step). A task that was left out of the last solve (no labels then) and has labels again
            before the next fresh step gets a stand-in weight until then: the mean of the cached weights of the
            tasks that were solved for (or, when none was, ``a`` of orthogonal gradients, ``1 / sqrt(M_ii)``).
            The cached weights are solved once at a common scale, so the mean is the weight of a typical task;
            re-solving instead, or forcing the next step to be fresh, would need the host to read the mask
            from the device (a synchronisation) or the solve to run on every step.
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

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """The bargaining weights ``a`` (solved on fresh steps, every ``update_every`` calls), norm-clipped if asked.

        Only the ``active`` tasks bargain (a task with a zero gradient would get ``a ~ 1 / sqrt(ridge)``); the
        others get 0. Between fresh steps the cached ``a`` is reused; a task it does not cover (``a = 0``) that
        is active again gets the stand-in weight described in the class docstring, which is cached with it.
        """
        if active is None:
            active = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
        fresh = self.calls % self.update_every == 0
        with torch.no_grad():
            if fresh:
                self.alpha.copy_(_active_nash_weights(gram, active, self.steps).to(self.alpha.dtype))
            else:
                self.alpha.copy_(_with_stand_ins(self.alpha, gram.to(self.alpha.dtype), active))
        self.calls += 1
        a = torch.where(active, self.alpha.to(gram.dtype), 0.0)
        if self.max_norm > 0:
            # gram is that of the unscaled gradients, so max_norm bounds the unscaled update
            norm = (a @ gram @ a).clamp_min(0).sqrt()
            a = a * (self.max_norm / norm.clamp_min(1e-30)).clamp_max(1)
        return a

    def get_extra_state(self):
        return {"calls": self.calls}

    def set_extra_state(self, state):
        self.calls = int(state["calls"])
