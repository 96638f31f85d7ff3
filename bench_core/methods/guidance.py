"""Guidance as denoiser wrappers: they take a denoiser and return one, so every sampler runs guided.

- ``ClassifierGuidance``: classifier guidance (Dhariwal & Nichol 2021, Alg. 2) with a noise-aware
  classifier ``classifier(x, sigma) -> logits`` in the denoiser's coordinates (x = x0 + sigma n).
- ``ClassifierFreeGuidance``: classifier-free guidance (Ho & Salimans 2022) of a class-conditional
  denoiser trained with label dropout; conditional and unconditional halves in one doubled batch.

Both read the requested class from the ``y`` keyword (a LongTensor (B,)), which the harness passes
per sample (``LoadedModel.batch_cond``).  ``y=None`` means unguided.

Derivation of the denoiser form.  Tweedie: D(x, sigma) = x + sigma^2 grad_x log p_sigma(x).  Bayes:
grad log p_sigma(x | y) = grad log p_sigma(x) + grad log p_sigma(y | x).  So the class-conditional
denoiser is D(x, sigma | y) = D(x, sigma) + sigma^2 grad_x log p_sigma(y | x), and with a guidance
scale s (p(y | x)^s):

    D_s(x, sigma | y) = D(x, sigma) + s sigma^2 grad_x log p_phi(y | x, sigma).

ADM's epsilon form (Alg. 2) on a VP model, x_t = sqrt(abar) x, sigma = sqrt((1 - abar) / abar):
eps_hat = eps - s sqrt(1 - abar) grad_{x_t} log p.  Since grad_{x_t} = grad_x / sqrt(abar),
sqrt(1 - abar) grad_{x_t} = sigma grad_x, and D = x - sigma eps gives D_hat = D + s sigma^2 grad_x log p:
the same update (tests/test_adm.py checks it numerically).  Classifier-free guidance with weight w is
(1 + w) D(x | y) - w D(x | null); with exact denoisers it equals classifier guidance with s = 1 + w.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..denoiser import DenoiserWrapper, bcast, expand_sigma


class ClassifierGuidance(DenoiserWrapper):
    """D_s(x, sigma | y) = D(x, sigma) + s sigma^2 grad_x log p_phi(y | x, sigma) (Dhariwal & Nichol 2021, Alg. 2).

    ``classifier(x, sigma) -> logits (B, K)``.  ``pass_label``: also give ``y`` to the wrapped
    denoiser (guiding a class-conditional model, as ADM-G does); otherwise it is withheld.
    ``grad_evals`` counts classifier-gradient evaluations (one per call on a batch); the harness
    records it apart from NFE.  With ``scale == 0`` or ``y is None`` the classifier is not evaluated.
    """

    def __init__(self, denoiser, classifier, scale: float = 1.0, *, pass_label: bool = False):
        if scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        super().__init__(denoiser)
        self.classifier = classifier
        self.scale, self.pass_label = float(scale), bool(pass_label)
        self.grad_evals = 0

    def log_prob_grad(self, x: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        """grad_x log p_phi(y | x, sigma), one backward pass through the classifier (counted)."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = self.classifier(x_in, expand_sigma(sigma, x).detach())
            log_p = F.log_softmax(logits, dim=-1)
            selected = log_p.gather(1, y.long().reshape(-1, 1)).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        self.grad_evals += 1
        return grad.to(x.dtype)

    def __call__(self, x: Tensor, sigma: Tensor, y: Tensor | None = None, **cond) -> Tensor:
        if self.pass_label and y is not None:
            cond = {**cond, "y": y}
        d = self.denoiser(x, sigma, **cond)
        if y is None or self.scale == 0.0:
            return d
        s = bcast(expand_sigma(sigma, x), x)
        return d + self.scale * s**2 * self.log_prob_grad(x, sigma, y)


class ClassifierFreeGuidance(DenoiserWrapper):
    """D_w(x, sigma | y) = (1 + w) D(x, sigma | y) - w D(x, sigma | null) (Ho & Salimans 2022, Eq. 6).

    One call of the wrapped denoiser on the doubled batch [x | y ; x | null]: one NFE (DESIGN.md).
    ``null_label`` is the index of the null class (the U-Net's ``num_classes``).  ``y is None``:
    the unconditional denoiser; ``w == 0``: the conditional one, on a single batch.
    """

    def __init__(self, denoiser, guidance_weight: float, null_label: int):
        super().__init__(denoiser)
        self.w, self.null_label = float(guidance_weight), int(null_label)

    def __call__(self, x: Tensor, sigma: Tensor, y: Tensor | None = None, **cond) -> Tensor:
        B = x.shape[0]
        if y is None:
            y = torch.full((B,), self.null_label, dtype=torch.long, device=x.device)
            return self.denoiser(x, sigma, y=y, **cond)
        if self.w == 0.0:
            return self.denoiser(x, sigma, y=y, **cond)
        sigma = expand_sigma(sigma, x)
        y_null = torch.full_like(y, self.null_label)
        doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (B,) else v for k, v in cond.items()}
        d = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), y=torch.cat([y, y_null]), **doubled)
        d_cond, d_uncond = d[:B], d[B:]
        return (1 + self.w) * d_cond - self.w * d_uncond


def balanced_labels(indices: Tensor, num_classes: int) -> Tensor:
    """Requested class of each sample: its index modulo the number of classes (independent of batching)."""
    return indices.long() % int(num_classes)
