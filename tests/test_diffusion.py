"""medhybrid.diffusion: EDM preconditioning, noise-level distributions, eq. 5 steps, Heun sampler, MDM masks."""

from __future__ import annotations

import math

import pytest
import torch

from medhybrid import diffusion as D


# --------------------------------------------------------------------------------------------- preconditioning
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_preconditioning_at_sigma_data(sigma_data):
    s = torch.tensor(sigma_data, dtype=torch.float64)
    assert D.c_skip(s, sigma_data).item() == pytest.approx(0.5)
    assert D.c_out(s, sigma_data).item() == pytest.approx(sigma_data / math.sqrt(2))
    assert D.c_in(s, sigma_data).item() == pytest.approx(1 / (sigma_data * math.sqrt(2)))


def test_preconditioning_known_values_and_limits():
    s = torch.tensor([0.0, 1.2, 80.0], dtype=torch.float64)
    # sigma = 1.2 with sigma_data = 0.5: sigma^2 + sigma_data^2 = 1.69 = 1.3^2
    assert D.c_skip(s).tolist() == pytest.approx([1.0, 0.25 / 1.69, 0.25 / 6400.25])
    assert D.c_out(s).tolist() == pytest.approx([0.0, 1.2 * 0.5 / 1.3, 80 * 0.5 / math.sqrt(6400.25)])
    assert D.c_in(s).tolist() == pytest.approx([2.0, 1 / 1.3, 1 / math.sqrt(6400.25)])
    assert D.c_noise(torch.tensor([1.0, math.e**4])).tolist() == pytest.approx([0.0, 1.0])
    # at high noise the denoiser ignores its input (c_skip -> 0) and c_out -> sigma_data
    assert D.c_out(torch.tensor(1e4, dtype=torch.float64)).item() == pytest.approx(0.5, rel=1e-6)


def test_unit_variance_target():
    """EDM's choice of c_skip, c_out makes the effective training target of F unit-variance (eq. 8 and
    Appendix B.6): c_out^2 = (1 - c_skip)^2 sigma_data^2 + c_skip^2 sigma^2, c_in^2 (sigma^2 + sigma_data^2) = 1."""
    s = torch.logspace(-3, 2, 50, dtype=torch.float64)
    sd = 0.5
    lhs = D.c_out(s, sd) ** 2
    rhs = (1 - D.c_skip(s, sd)) ** 2 * sd**2 + D.c_skip(s, sd) ** 2 * s**2
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(D.c_in(s, sd) ** 2 * (s**2 + sd**2), torch.ones_like(s))


@pytest.mark.parametrize("sigma_data", [0.5, 0.8])
def test_loss_weight_is_inverse_c_out_squared(sigma_data):
    s = torch.logspace(-3, 2, 40, dtype=torch.float64)
    torch.testing.assert_close(D.loss_weight(s, sigma_data), 1 / D.c_out(s, sigma_data) ** 2)
    assert D.loss_weight(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx((1 + 0.25) / 0.25)


# --------------------------------------------------------------------------------------------- sampling steps
def test_sampling_sigmas_endpoints_and_order():
    s = D.sampling_sigmas(18)
    assert s.shape == (19,) and s.dtype == torch.float64
    assert s[0].item() == pytest.approx(80.0) and s[17].item() == pytest.approx(0.002) and s[18].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())
    s2 = D.sampling_sigmas(2, sigma_min=0.01, sigma_max=10.0)
    assert s2.tolist() == pytest.approx([10.0, 0.01, 0.0])


def test_sampling_sigmas_follow_eq5():
    n, smin, smax, rho = 7, 0.002, 80.0, 7.0
    s = D.sampling_sigmas(n, smin, smax, rho)
    for i in range(n):
        expected = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert s[i].item() == pytest.approx(expected, rel=1e-12)
    # rho = 1 is a linear schedule
    assert D.sampling_sigmas(5, 1.0, 5.0, rho=1.0).tolist() == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="at least 2 sampling steps"):
        D.sampling_sigmas(1)


# --------------------------------------------------------------------------------------------- training noise levels
def test_lognormal_sigma_statistics():
    g = torch.Generator().manual_seed(0)
    s = D.sample_sigma_lognormal(200_000, p_mean=-1.2, p_std=1.2, generator=g)
    assert s.shape == (200_000,) and bool((s > 0).all())
    ln = s.double().log()
    assert ln.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert ln.std().item() == pytest.approx(1.2, abs=0.01)
    # about half of the EDM training noise levels lie below exp(P_mean) = 0.30
    assert (s < math.exp(-1.2)).double().mean().item() == pytest.approx(0.5, abs=0.01)
    # same generator seed, same draw
    again = D.sample_sigma_lognormal(200_000, -1.2, 1.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, again)


def test_loguniform_sigma_statistics():
    g = torch.Generator().manual_seed(1)
    s = D.sample_sigma_loguniform(100_000, 0.002, 0.1, generator=g)
    assert float(s.min()) >= 0.002 * (1 - 1e-6) and float(s.max()) <= 0.1 * (1 + 1e-6)
    ln = s.double().log()
    assert ln.mean().item() == pytest.approx((math.log(0.002) + math.log(0.1)) / 2, abs=0.02)
    # uniform in log: a quarter of the draws in the lowest quarter of the log range
    q = math.exp(math.log(0.002) + 0.25 * (math.log(0.1) - math.log(0.002)))
    assert (s < q).double().mean().item() == pytest.approx(0.25, abs=0.01)


def test_mdm_sigma_spans_sigma_range():
    p = D.EDMParams()
    r = torch.linspace(0, 1, 11)
    s = D.mdm_sigma(r, p)
    assert s[0].item() == pytest.approx(p.sigma_min, rel=1e-5) and s[-1].item() == pytest.approx(p.sigma_max, rel=1e-5)
    assert bool((s[1:] > s[:-1]).all())
    # log-linear: the middle ratio sits at the geometric mean
    assert s[5].item() == pytest.approx(math.sqrt(p.sigma_min * p.sigma_max), rel=1e-5)


# --------------------------------------------------------------------------------------------- Heun sampler
@pytest.mark.parametrize("c", [0.3, -0.7])
def test_heun_sample_point_mass_returns_the_point(c):
    """Data = the constant image c: the exact denoiser is D(x; sigma) = c, and the sampler must land on c."""
    latents = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def denoise(x, sigma):
        calls.append(sigma)
        assert x.shape == latents.shape and sigma.shape == (3,)
        return torch.full_like(x, c)

    out = D.heun_sample(denoise, latents, D.sampling_sigmas(10))
    assert out.dtype == torch.float32 and out.shape == latents.shape
    torch.testing.assert_close(out, torch.full_like(out, c), atol=1e-6, rtol=0)
    assert len(calls) == 2 * 10 - 1  # Heun: two evaluations per step, Euler on the last step to sigma = 0


def test_heun_sample_gaussian_data_matches_probability_flow():
    """Data ~ N(mu, s^2) per pixel: D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu). The probability-flow ODE
    then keeps (x - mu) / sqrt(s^2 + sigma^2) constant, so each sample has a closed form."""
    mu, sd = 0.2, 0.4
    latents = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    def denoise(x, sigma):
        s2 = sigma.view(-1, 1, 1, 1).double() ** 2
        return (mu + sd**2 / (sd**2 + s2) * (x.double() - mu)).float()

    def error(steps: int) -> tuple[float, torch.Tensor]:
        sigmas = D.sampling_sigmas(steps)
        out = D.heun_sample(denoise, latents, sigmas).double()
        smax = float(sigmas[0])
        exact = mu + (latents.double() * smax - mu) * sd / math.sqrt(sd**2 + smax**2)
        return (out - exact).abs().max().item(), out

    e40, out = error(40)
    e80, _ = error(80)
    assert e40 < 0.03 and e80 < 0.006
    assert 0.15 < e80 / e40 < 0.35  # second order: twice the steps, a quarter of the error (Euler would halve it)
    assert out.mean().item() == pytest.approx(mu, abs=0.03)
    assert out.std().item() == pytest.approx(sd, abs=0.02)


# --------------------------------------------------------------------------------------------- MDM masks
def test_patch_mask_exact_fraction_and_alignment():
    ratio = torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0])
    m = D.patch_mask((5, 3, 32, 48), ratio, patch=8, generator=torch.Generator().manual_seed(0))
    assert m.shape == (5, 1, 32, 48) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    n = (32 // 8) * (48 // 8)
    for b, r in enumerate(ratio.tolist()):
        assert m[b].mean().item() == pytest.approx(round(r * n) / n)
    # each 8 x 8 patch (aligned to the grid) is all masked or all visible
    blocks = m.view(5, 1, 4, 8, 6, 8)
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))


def test_patch_mask_is_random_per_image_and_reproducible():
    ratio = torch.full((8,), 0.5)
    a = D.patch_mask((8, 1, 32, 32), ratio, 8, generator=torch.Generator().manual_seed(3))
    b = D.patch_mask((8, 1, 32, 32), ratio, 8, generator=torch.Generator().manual_seed(3))
    c = D.patch_mask((8, 1, 32, 32), ratio, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(x.flatten().tolist()) for x in a}) > 1  # images of a batch get different masks


def test_patch_mask_rejects_unaligned_size():
    with pytest.raises(ValueError, match="not a multiple of the MDM patch size 8"):
        D.patch_mask((1, 1, 30, 32), torch.tensor([0.5]), 8)
