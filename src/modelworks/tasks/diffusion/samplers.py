"""Samplers: the loop around the denoising network, outside any exported graph, so every runtime drives it.

- `ddpm`: ancestral sampling (Ho et al. 2020), the reverse posterior q(x_s | x_t, x_0) at each step: DDIM with
  eta = 1 is exactly that posterior (Song et al. 2021, eq. 16), so both are one update here.
- `ddim`: DDIM (Song et al. 2021) with `eta` (0: deterministic given x_T).
- `dpm-solver`: DPM-Solver++(2M) (Lu et al. 2022), the second-order multistep solver in data prediction; first order
  at the first and last step, as the authors recommend for few steps.

Each uses one network evaluation per step. A `SamplingRun` is one request's sampling, advanced one step at a
time: `drive` advances many runs together with one network call per step for all of them (their rows
concatenated), so requests of different lengths, samplers and guidance share each call. Classifier-free guidance
(Ho & Salimans 2022) puts the conditional and the unconditional rows of a request in the same call and mixes the
outputs as (1 + w) * conditional - w * unconditional: w = 0 is plain conditional sampling (no second row).
Everything random comes from the request's own seeded generator, so a request gives the same images whatever it
is batched with.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .noise import NoiseProcess

SAMPLERS = ("ddpm", "ddim", "dpm-solver")
GRIDS = ("time", "log-snr", "karras")
KARRAS_RHO = 7.0  # Karras et al. 2022's spacing of the noise levels
KARRAS_SIGMAS = (0.002, 80.0)  # their range of noise levels sigma / alpha (the process's own ends where narrower)

# (x_t [N, C, H, W] float32, t [N] float32, y [N] int64) -> the network's output [N, C, H, W]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, process: NoiseProcess | None = None, grid: str = "time") -> torch.Tensor:
    """steps + 1 times from 1 (pure noise) down to 0. `time`: evenly spaced in t. `log-snr`: evenly spaced in the
    log-SNR (DPM-Solver's choice for small images), from lambda(1) (or -log(KARRAS_SIGMA_MAX^2) where that is
    higher: lower levels are all noise to the eye) to lambda(0). `karras`: the noise levels sigma/alpha spaced as
    Karras et al. (rho 7) over the same range, denser at low noise. The ends are always t = 1 and t = 0."""
    if grid not in GRIDS:
        raise ValueError(f"grid: {grid!r} is not a time grid; use one of {', '.join(GRIDS)}")
    uniform = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if grid == "time":
        return uniform
    ends = process.log_snr(torch.tensor([1.0, 0.0], dtype=torch.float64))
    sigma_min, sigma_max = KARRAS_SIGMAS
    low, high = max(float(ends[0]), -2 * math.log(sigma_max)), min(float(ends[1]), -2 * math.log(sigma_min))
    if grid == "log-snr":
        lam = low + (high - low) * (1 - uniform)
    else:  # sigma = exp(-lambda / 2), spaced evenly in sigma^(1/rho)
        s_max, s_min = math.exp(-low / 2) ** (1 / KARRAS_RHO), math.exp(-high / 2) ** (1 / KARRAS_RHO)
        sigma = (s_max + (1 - uniform) * (s_min - s_max)) ** KARRAS_RHO
        lam = -2 * torch.log(sigma)
    times = process.time_of_log_snr(lam)
    times[0], times[-1] = 1.0, 0.0
    return times


class SamplingRun:
    """`n` images of class `label` (None: unconditional), from `seed`."""

    def __init__(self, process: NoiseProcess, shape: Sequence[int], n: int, label: int | None, null_label: int,
                 sampler: str = "dpm-solver", steps: int = 20, guidance: float = 0.0, eta: float = 0.0,
                 seed: int = 0, grid: str = "time"):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: {sampler!r} is not a sampler; use one of {', '.join(SAMPLERS)}")
        self.process, self.sampler, self.steps = process, sampler, steps
        self.eta = 1.0 if sampler == "ddpm" else eta
        self.guided = label is not None and guidance > 0
        self.guidance = guidance
        self.n = n
        labels = torch.full((n,), null_label if label is None else label, dtype=torch.int64)
        self.y = torch.cat([labels, torch.full((n,), null_label, dtype=torch.int64)]) if self.guided else labels
        self.generator = torch.Generator().manual_seed(int(seed))
        self.x = torch.randn((n, *shape), generator=self.generator, dtype=torch.float32)
        self.times = time_grid(steps, process, grid)
        self.alphas, self.sigmas = process.alpha_sigma(self.times)
        self.log_snrs = process.log_snr(self.times)
        self.i = 0
        self.previous_x0: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.i >= self.steps

    @property
    def rows(self) -> int:
        """Rows this run adds to each network call."""
        return 2 * self.n if self.guided else self.n

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.cat([self.x, self.x]) if self.guided else self.x
        t = torch.full((len(x),), float(self.times[self.i]), dtype=torch.float32)
        return x, t, self.y

    def advance(self, output: torch.Tensor) -> None:
        """One step with the network's output for this run's rows."""
        output = output.float()
        if self.guided:
            conditional, unconditional = output.chunk(2)
            output = (1 + self.guidance) * conditional - self.guidance * unconditional
        i = self.i
        t = torch.full((self.n,), float(self.times[i]), dtype=torch.float64)
        x0, _ = self.process.predict_x0_eps(self.x, t, output)
        x0 = x0.clamp(-1, 1)  # the data's range: an eps model's x_0 at high noise is far outside it
        a_t, s_t, a_s, s_s = (float(v) for v in (self.alphas[i], self.sigmas[i], self.alphas[i + 1],
                                                   self.sigmas[i + 1]))
        if self.sampler == "dpm-solver":
            h = float(self.log_snrs[i + 1] - self.log_snrs[i]) / 2  # in log(alpha / sigma), half the log-SNR
            d = x0
            if self.previous_x0 is not None and i + 1 < self.steps:
                h_previous = float(self.log_snrs[i] - self.log_snrs[i - 1]) / 2
                r = h_previous / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self.previous_x0
            self.x = (s_s / s_t) * self.x - a_s * torch.expm1(torch.tensor(-h)).item() * d
            self.previous_x0 = x0
        else:
            eps = (self.x - a_t * x0) / s_t  # consistent with the clamped x_0
            c = self.eta * (s_s / s_t) * max(0.0, 1 - (a_t / a_s) ** 2) ** 0.5
            self.x = a_s * x0 + max(0.0, s_s ** 2 - c ** 2) ** 0.5 * eps
            if c > 0 and i + 1 < self.steps:
                self.x = self.x + c * torch.randn(self.x.shape, generator=self.generator)
        self.i += 1

    def images(self) -> torch.Tensor:
        """The samples as uint8 [n, C, H, W], from [-1, 1]."""
        return ((self.x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def drive(runs: list[SamplingRun], denoise: Denoiser, on_step: Callable[[], None] | None = None) -> None:
    """Advance every run to its end, one network call per step for all unfinished runs together."""
    while True:
        active = [run for run in runs if not run.finished]
        if not active:
            return
        parts = [run.inputs() for run in active]
        output = denoise(*(torch.cat(column) for column in zip(*parts)))
        start = 0
        for run in active:
            run.advance(output[start:start + run.rows])
            start += run.rows
        if on_step is not None:
            on_step()


def torch_denoiser(model: torch.nn.Module, batch_size: int = 0) -> Denoiser:
    """A Denoiser over an eager module, in chunks of `batch_size` rows (0: all at once), without gradients."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size = batch_size or len(x)
        outputs = [model(x[i:i + size].to(device), t[i:i + size].to(device), y[i:i + size].to(device)).float().cpu()
                   for i in range(0, len(x), size)]
        return torch.cat(outputs)

    return denoise
