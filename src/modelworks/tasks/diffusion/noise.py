"""The noise process of a diffusion model, kept apart from the network: a variance-preserving process
x_t = alpha_t x_0 + sigma_t eps with alpha_t^2 + sigma_t^2 = 1, over continuous time t in [0, 1].

Schedules: `linear` (DDPM's betas 1e-4..0.02 over 1000 steps, as the continuous VP-SDE of Song et al. 2021:
beta(t) = 0.1 + 19.9 t) and `cosine` (Nichol & Dhariwal 2021). Both are written through the log signal-to-noise
ratio lambda = log(alpha^2 / sigma^2), clipped to +-LOG_SNR_LIMIT so that t = 0 and t = 1 stay finite (at -15 the
signal left is 0.05% of x_T: pure noise to the eye). Parametrisations: `eps` (Ho et al. 2020) and `v`
(Salimans & Ho 2022: v = alpha eps - sigma x_0), both turned into the data prediction x_0 for the samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SNR_LIMIT = 15.0
LINEAR_BETA = (0.1, 20.0)  # DDPM's 1000 x (1e-4, 0.02): the continuous-time equivalent
COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s


@dataclass(frozen=True)
class NoiseProcess:
    schedule: str = "cosine"  # linear | cosine
    parametrisation: str = "v"  # eps | v

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"model.schedule: {self.schedule!r} is not a schedule; use linear or cosine")
        if self.parametrisation not in ("eps", "v"):
            raise ValueError(f"model.parametrisation: {self.parametrisation!r} is not one; use eps or v")

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t^2, the signal's share of the variance at time t, before clipping."""
        t = t.double()
        if self.schedule == "linear":
            b0, b1 = LINEAR_BETA
            return torch.exp(-(b0 * t + 0.5 * (b1 - b0) * t * t))
        s = COSINE_OFFSET
        f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return (f(t) / f(torch.zeros_like(t))).clamp(0, 1)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(t)
        return (torch.log(ab) - torch.log1p(-ab)).clamp(-LOG_SNR_LIMIT, LOG_SNR_LIMIT)

    def time_of_log_snr(self, lam: torch.Tensor, iterations: int = 60) -> torch.Tensor:
        """The t in [0, 1] where log_snr(t) = lam (float64), by bisection: log_snr falls monotonically with t for
        every schedule, so one inverse serves them all (60 halvings: below float64's resolution of [0, 1])."""
        lam = lam.double()
        low, high = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(iterations):
            mid = (low + high) / 2
            above = self.log_snr(mid) > lam  # still too little noise: the answer is later
            low, high = torch.where(above, mid, low), torch.where(above, high, mid)
        return (low + high) / 2

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in float64, from the clipped log-SNR: alpha^2 = sigmoid(lambda)."""
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with the given standard normal `eps`."""
        alpha, sigma = (v.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1)) for v in self.alpha_sigma(t))
        return alpha * x0 + sigma * eps

    def target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the network learns to output at (x_t, t)."""
        if self.parametrisation == "eps":
            return eps
        alpha, sigma = (v.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1)) for v in self.alpha_sigma(t))
        return alpha * eps - sigma * x0

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023) as a weight on this parametrisation's loss: min(SNR, gamma) on the
        x_0 error, which is SNR times the eps error and (SNR + 1) times the v error."""
        snr = torch.exp(self.log_snr(t))
        return snr.clamp(max=gamma) / (snr if self.parametrisation == "eps" else snr + 1)

    def predict_x0_eps(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output at (x_t, t) as its predictions of x_0 and eps."""
        alpha, sigma = (v.to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1)) for v in self.alpha_sigma(t))
        if self.parametrisation == "eps":
            eps = output
            x0 = (x_t - sigma * eps) / alpha
        else:
            x0 = alpha * x_t - sigma * output
            eps = sigma * x_t + alpha * output
        return x0, eps

    def spec(self) -> dict:
        return {"schedule": self.schedule, "parametrisation": self.parametrisation, "log_snr_limit": LOG_SNR_LIMIT,
                "time": "continuous t in [0, 1]; the network's time input is t"}
