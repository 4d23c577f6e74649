"""Aligned-MTL: independent component alignment."""

from __future__ import annotations

import torch

from fastmtl.mtl.weighting.base import GradientWeighting, masked_gram, register


@register("aligned_mtl")
class AlignedMTL(GradientWeighting):
    """Aligned-MTL of Senushkin, Patakin, Kuznetsov and Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023 (arXiv:2305.19000).

    The task gradients ``G`` are replaced by the aligned ``B G`` whose rows are orthogonal with equal norms, the
    smallest singular value of ``G``: with the Gramian ``M = V diag(lambda) V^T``,
    ``B = sqrt(lambda_min) V diag(lambda^{-1/2}) V^T`` (directions with ``lambda`` below a relative tolerance are
    dropped, so a rank-deficient ``G`` is handled). The update is the sum of the aligned gradients, i.e.
    coefficients ``B 1``. The eigendecomposition of the ``K x K`` Gramian runs on the device (note: on CUDA,
    ``torch.linalg.eigh`` checks its convergence flag on the host, the one synchronisation of this method).
    """

    def compute_weights(self, gram, losses, active=None, precision=None, loss_scale=None):
        """``B 1`` from the eigendecomposition of the Gramian.

        An eigenvalue counts as zero below ``lambda_max K precision``; from :meth:`GradientWeighting.combine`,
        ``precision`` is ``eps_g^2 + eps_w sqrt(P)``: the gradients' rounding to their dtype (squared, as it lifts
        a zero eigenvalue of the Gramian by at most ``eps_g^2`` times the trace) plus the rounding of the
        Gramian's dot products. So bf16 or fp16 gradients at a small angle keep their rank, while rounding noise
        (``g`` and ``3 g``, each rounded to bf16) does not add one.
        """
        if precision is None:
            precision = torch.finfo(gram.dtype).eps
        eigenvalues, eigenvectors = torch.linalg.eigh(masked_gram(gram, active))
        keep = eigenvalues > eigenvalues.amax().clamp_min(0) * (gram.shape[0] * precision) + 1e-300
        inverse_root = torch.where(keep, eigenvalues.clamp_min(1e-300).rsqrt(), torch.zeros_like(eigenvalues))
        smallest = torch.where(keep, eigenvalues, torch.full_like(eigenvalues, float("inf"))).amin()
        smallest = torch.where(torch.isfinite(smallest), smallest, torch.zeros_like(smallest))
        balance = smallest.sqrt() * (eigenvectors * inverse_root) @ eigenvectors.T
        return balance.sum(1)
