"""The diffusion task's parts against hand-computed values: the noise process, the samplers on denoisers whose
answer is known in closed form, classifier-free guidance, and the FID/KID arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelworks.tasks.diffusion.metrics import feature_statistics, frechet_distance, kernel_inception_distance
from modelworks.tasks.diffusion.models import UNet
from modelworks.tasks.diffusion.noise import LOG_SNR_LIMIT, NoiseProcess
from modelworks.tasks.diffusion.samplers import SamplingRun, drive, time_grid, torch_denoiser

SHAPE = (1, 4, 4)
NULL = 3  # three classes, the fourth row is the null class


# ---------------------------------------------------------------------------------------------- noise process


def test_linear_schedule_matches_ddpm_discrete_betas():
    """The continuous linear schedule is DDPM's betas 1e-4..0.02 over 1000 steps: alpha_bar(k / 1000) is the
    product of (1 - beta_i) up to step k, within 1% in log."""
    betas = np.linspace(1e-4, 0.02, 1000)
    discrete = np.cumprod(1 - betas)
    process = NoiseProcess("linear", "eps")
    for k in (100, 300, 500, 700):
        continuous = process.alpha_bar(torch.tensor([k / 1000])).item()
        assert math.log(continuous) == pytest.approx(math.log(discrete[k - 1]), rel=0.01)
    assert process.alpha_bar(torch.tensor([1.0])).item() == pytest.approx(math.exp(-(0.1 + 0.5 * 19.9)))


def test_cosine_schedule_values_and_clipping():
    process = NoiseProcess("cosine", "v")
    s = 0.008
    t = torch.tensor([0.0, 0.5, 1.0])
    expected_half = math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert process.alpha_bar(t)[1].item() == pytest.approx(expected_half, rel=1e-9)
    log_snr = process.log_snr(t)
    assert log_snr[0].item() == LOG_SNR_LIMIT and log_snr[2].item() == -LOG_SNR_LIMIT  # finite at both ends
    alpha, sigma = process.alpha_sigma(torch.linspace(0, 1, 11))
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(11, dtype=torch.float64))
    assert bool((alpha[1:] < alpha[:-1]).all())  # the signal only decreases


@pytest.mark.parametrize("parametrisation", ["eps", "v"])
def test_forward_process_at_known_t_and_the_parametrisations_invert(parametrisation):
    process = NoiseProcess("cosine", parametrisation)
    x0 = torch.tensor([[[[0.5, -1.0]]]])
    eps = torch.tensor([[[[1.0, 2.0]]]])
    t = torch.tensor([0.5])
    alpha, sigma = (v.item() for v in process.alpha_sigma(t))
    x_t = process.add_noise(x0, t, eps)
    torch.testing.assert_close(x_t, torch.tensor([[[[alpha * 0.5 + sigma, -alpha + 2 * sigma]]]]))
    target = process.target(x0, t, eps)
    if parametrisation == "v":
        torch.testing.assert_close(target, alpha * eps - sigma * x0)
    x0_hat, eps_hat = process.predict_x0_eps(x_t, t, target)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


# ---------------------------------------------------------------------------------------------- samplers


def gaussian_denoiser(process: NoiseProcess, mean: float, std: float):
    """The exact network output for data ~ N(mean, std^2) per pixel: E[x_0 | x_t] in closed form, expressed in
    the process's parametrisation (so a perfect sampler reproduces the data distribution)."""

    def denoise(x, t, y):
        alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in process.alpha_sigma(t.double()))
        x0 = mean + alpha * std ** 2 / (alpha ** 2 * std ** 2 + sigma ** 2) * (x - alpha * mean)
        eps = (x - alpha * x0) / sigma
        return eps if process.parametrisation == "eps" else alpha * eps - sigma * x0

    return denoise


def run(process, sampler, steps, seed=0, n=1, label=None, guidance=0.0, eta=0.0, denoise=None):
    r = SamplingRun(process, SHAPE, n, label, NULL, sampler, steps, guidance, eta, seed)
    drive([r], denoise)
    return r


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver"])
def test_deterministic_samplers_follow_the_exact_flow(sampler):
    """For Gaussian data the probability-flow ODE maps x_T to mean + std * x_T / sqrt(alpha^2 std^2 + sigma^2)
    (t = 1): DDIM and DPM-Solver++ land there on average (a few samples beyond the data range [-1, 1] are
    clamped, as every sample is)."""
    process = NoiseProcess("cosine", "v")
    mean, std = 0.1, 0.25
    denoise = gaussian_denoiser(process, mean, std)
    r = run(process, sampler, 50, n=64, denoise=denoise)
    x_T = torch.randn((64, *SHAPE), generator=torch.Generator().manual_seed(0))
    a1, s1 = (v.item() for v in process.alpha_sigma(torch.tensor([1.0])))
    exact = mean + std * (x_T - a1 * mean) / math.sqrt(a1 ** 2 * std ** 2 + s1 ** 2)
    assert (r.x - exact).abs().mean().item() < 0.02


def test_fast_solver_at_20_steps_beats_ddim():
    """Measured: mean error against 200 steps 0.0095 for DPM-Solver++(2M) at 20 steps, 0.026 for DDIM."""
    process = NoiseProcess("cosine", "eps")
    denoise = gaussian_denoiser(process, 0.1, 0.25)
    reference = run(process, "dpm-solver", 200, n=64, denoise=denoise).x
    dpm = run(process, "dpm-solver", 20, n=64, denoise=denoise).x
    ddim = run(process, "ddim", 20, n=64, denoise=denoise).x
    assert (dpm - reference).abs().mean() < 0.5 * (ddim - reference).abs().mean()
    assert (dpm - reference).abs().mean().item() < 0.015


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_log_snr_inverts_to_time(schedule):
    process = NoiseProcess(schedule, "v")
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    assert torch.allclose(process.time_of_log_snr(process.log_snr(t)), t, atol=1e-9)


@pytest.mark.parametrize("grid", ["log-snr", "karras"])
def test_time_grids_run_from_noise_to_data_as_designed(grid):
    """Both grids run from t = 1 to t = 0, strictly decreasing; log-snr's inner steps are evenly spaced in the
    log-SNR, karras's in sigma^(1/7) (sigma = sigma_t / alpha_t), over sigma in [0.002, 80]."""
    process = NoiseProcess("cosine", "v")
    times = time_grid(10, process, grid)
    assert times[0] == 1.0 and times[-1] == 0.0 and bool((times.diff() < 0).all())
    lam = process.log_snr(times[1:-1])
    if grid == "log-snr":
        assert torch.allclose(lam.diff(), lam.diff()[:1].expand(8), atol=1e-6)
        assert lam.diff()[0].item() == pytest.approx((-2 * math.log(0.002) + 2 * math.log(80)) / 10, rel=1e-6)
    else:
        root = torch.exp(-lam / 2) ** (1 / 7)
        assert torch.allclose(root.diff(), root.diff()[:1].expand(8), atol=1e-6)
    with pytest.raises(ValueError, match="grid: 'uniform' is not a time grid"):
        time_grid(10, process, "uniform")


@pytest.mark.parametrize("grid", ["log-snr", "karras"])
def test_the_fast_solver_reaches_the_exact_flow_on_every_grid(grid):
    process = NoiseProcess("cosine", "v")
    denoise = gaussian_denoiser(process, 0.1, 0.25)
    reference = run(process, "dpm-solver", 200, n=64, denoise=denoise).x
    r = SamplingRun(process, SHAPE, 64, None, NULL, "dpm-solver", 20, seed=0, grid=grid)
    drive([r], denoise)
    assert (r.x - reference).abs().mean().item() < 0.015


def test_min_snr_weight_caps_the_x0_weight_at_gamma():
    """min(SNR, gamma) on the x_0 error: SNR times the eps error, SNR + 1 times the v error."""
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    for parametrisation, scale in (("eps", lambda snr: snr), ("v", lambda snr: snr + 1)):
        process = NoiseProcess("cosine", parametrisation)
        snr = torch.exp(process.log_snr(t))
        assert torch.allclose(process.min_snr_weight(t, 5.0) * scale(snr), snr.clamp(max=5.0))
    assert snr[0] > 5 > snr[-1]  # both sides of the cap are covered


def test_ddpm_samples_have_the_data_distribution():
    process = NoiseProcess("linear", "eps")
    r = run(process, "ddpm", 250, n=256, denoise=gaussian_denoiser(process, 0.1, 0.25))
    assert r.x.mean().item() == pytest.approx(0.1, abs=0.02)
    assert r.x.std().item() == pytest.approx(0.25, rel=0.1)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    model = UNet(1, 3, "xs").eval()
    for p in model.parameters():  # away from the zero initialisation, so the output depends on everything
        p.data.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
def test_each_sampler_is_seeded_on_a_tiny_model(sampler, tiny_unet):
    process = NoiseProcess("cosine", "v")
    denoise = torch_denoiser(tiny_unet)
    first = run(process, sampler, 3, seed=5, n=2, label=1, denoise=denoise, eta=0.5).images()
    again = run(process, sampler, 3, seed=5, n=2, label=1, denoise=denoise, eta=0.5).images()
    other = run(process, sampler, 3, seed=6, n=2, label=1, denoise=denoise, eta=0.5).images()
    assert first.dtype == torch.uint8 and first.shape == (2, *SHAPE)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_ddim_with_eta_zero_uses_no_noise_after_x_T(tiny_unet):
    """DDIM eta=0 is a function of x_T alone: the generator is not drawn from after the start."""
    process = NoiseProcess("cosine", "v")
    denoise = torch_denoiser(tiny_unet)
    plain = SamplingRun(process, SHAPE, 2, 0, NULL, "ddim", 4, 0.0, 0.0, seed=3)
    disturbed = SamplingRun(process, SHAPE, 2, 0, NULL, "ddim", 4, 0.0, 0.0, seed=3)
    disturbed.generator.manual_seed(999)
    drive([plain, disturbed], denoise)
    assert torch.equal(plain.x, disturbed.x)
    noisy = SamplingRun(process, SHAPE, 2, 0, NULL, "ddim", 4, 0.0, 1.0, seed=3)
    drive([noisy], denoise)
    assert not torch.equal(plain.x, noisy.x)


def test_batched_runs_give_the_same_images_as_alone(tiny_unet):
    """drive() shares each network call among runs of different lengths and samplers; each run's images are
    those it gets alone."""
    process = NoiseProcess("cosine", "v")
    denoise = torch_denoiser(tiny_unet)
    specs = [("dpm-solver", 3, 1, 2.0), ("ddim", 5, None, 0.0), ("ddpm", 2, 2, 1.0)]
    together = [SamplingRun(process, SHAPE, 2, label, NULL, s, k, g, 0.0, seed=i)
                for i, (s, k, label, g) in enumerate(specs)]
    drive(together, denoise)
    for i, (s, k, label, g) in enumerate(specs):
        alone = run(process, s, k, seed=i, n=2, label=label, guidance=g, denoise=denoise)
        torch.testing.assert_close(alone.x, together[i].x, atol=1e-5, rtol=1e-5)


def test_classifier_free_guidance_mixes_conditional_and_unconditional():
    """Rows: [conditional; unconditional (null class)] in one call; output (1 + w) c - w u. w = 0 is plain
    conditional sampling with no unconditional rows; an unconditional request ignores w."""
    process = NoiseProcess("cosine", "v")
    calls = []

    def denoise(x, t, y):
        calls.append(y.clone())
        return torch.where((y == NULL).view(-1, 1, 1, 1), torch.zeros_like(x), torch.ones_like(x))

    guided = run(process, "ddim", 1, n=2, label=1, guidance=2.0, denoise=denoise)
    assert calls[-1].tolist() == [1, 1, NULL, NULL]
    # one DDIM step from t=1 to 0 with v = (1 + 2) * 1 - 2 * 0 = 3 everywhere
    expected = run(process, "ddim", 1, n=2, label=1, denoise=lambda x, t, y: torch.full_like(x, 3.0))
    torch.testing.assert_close(guided.x, expected.x)
    run(process, "ddim", 1, n=2, label=1, guidance=0.0, denoise=denoise)
    assert calls[-1].tolist() == [1, 1]
    run(process, "ddim", 1, n=2, label=None, guidance=2.0, denoise=denoise)
    assert calls[-1].tolist() == [NULL, NULL]


# ---------------------------------------------------------------------------------------------- FID / KID


def test_frechet_distance_on_hand_computed_gaussians():
    # ||(1, 0)||^2 + tr(I + 4I - 2 * 2I) = 1 + 2
    assert frechet_distance(np.zeros(2), np.eye(2), np.array([1.0, 0.0]), 4 * np.eye(2)) == pytest.approx(3.0)
    # Non-commuting covariances: S1 = diag(1, 4), S2 = rotation of diag(9, 1) by 45 degrees. tr((S1 S2)^(1/2)) from
    # the 2x2 identity tr(sqrt(M)) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.diag([1.0, 4.0])
    c = s = math.sqrt(0.5)
    rotation = np.array([[c, -s], [s, c]])
    s2 = rotation @ np.diag([9.0, 1.0]) @ rotation.T
    product = s1 @ s2
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = 5 + 10 - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-9)
    features = np.random.default_rng(0).normal(size=(200, 3))
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_kernel_inception_distance_on_a_hand_case():
    """d = 1, k(x, y) = (x y + 1)^3: X = {0, 1}, Y = {0, 2}. Off-diagonal k_xx: k(0, 1) = 1 (twice, over 2 pairs)
    -> 1; k_yy likewise 1; k_xy: 1, 1, 1, 27 -> mean 7.5. MMD^2 = 1 + 1 - 2 * 7.5 = -13."""
    mean, std = kernel_inception_distance(np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]]), subsets=5)
    assert mean == pytest.approx(-13.0) and std == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    same = kernel_inception_distance(rng.normal(size=(300, 4)), rng.normal(size=(300, 4)), subsets=10,
                                     subset_size=200)[0]
    shifted = kernel_inception_distance(rng.normal(size=(300, 4)), rng.normal(1.0, 1.0, size=(300, 4)), subsets=10,
                                        subset_size=200)[0]
    assert abs(same) < 0.05 < shifted
