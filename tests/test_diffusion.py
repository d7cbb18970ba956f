"""medhybrid.networks.diffusion: EDM preconditioning, noise-level distributions, eq. 5 steps, Heun sampler, MDM masks."""

from __future__ import annotations

import math

import pytest
import torch

from medhybrid.networks import diffusion as D

# --------------------------------------------------------------------------------------------- preconditioning
# Reference values of Karras et al. 2022, Table 1 ("Ours"), computed independently of medhybrid: with mpmath at 40
# digits (mp.mp.dps = 40) from the paper's formulas, for sigma_data = 0.5:
#   c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4,
#   lambda = (s^2 + sd^2) / (s sd)^2,
# and printed with mp.nstr(v, 17). Columns: sigma, c_skip, c_out, c_in, c_noise, lambda.
EDM_TABLE1_SD05 = [
    (0.002, 0.9999840002559959, 0.0019999840001919974, 1.9999840001919974, -1.5536520246055479, 250004.0),
    (0.5, 0.5, 0.35355339059327376, 1.414213562373095, -0.17328679513998633, 8.0),
    (1.2, 0.14792899408284024, 0.46153846153846154, 0.76923076923076923, 0.045580389198488657, 4.6944444444444444),
    (80.0, 3.9060974180696067e-5, 0.49999023466109298, 0.012499755866527325, 1.0955066586684704, 4.00015625),
]


def test_edm_defaults_are_table1():
    p = D.EDMParams()
    assert (p.sigma_min, p.sigma_max, p.sigma_data, p.p_mean, p.p_std, p.rho) == (0.002, 80.0, 0.5, -1.2, 1.2, 7.0)


@pytest.mark.parametrize("row", EDM_TABLE1_SD05, ids=lambda r: f"sigma={r[0]}")
def test_preconditioning_matches_table1_values(row):
    sigma, c_skip, c_out, c_in, c_noise, lam = row
    s = torch.tensor([sigma], dtype=torch.float64)
    assert D.c_skip(s).item() == pytest.approx(c_skip, rel=1e-12)
    assert D.c_out(s).item() == pytest.approx(c_out, rel=1e-12)
    assert D.c_in(s).item() == pytest.approx(c_in, rel=1e-12)
    assert D.c_noise(s).item() == pytest.approx(c_noise, rel=1e-12)
    assert D.loss_weight(s).item() == pytest.approx(lam, rel=1e-12)
    # the defaults are sigma_data = 0.5: passing it changes nothing
    assert D.c_out(s, 0.5).item() == pytest.approx(c_out, rel=1e-12)


def test_preconditioning_other_sigma_data_and_limits():
    # sigma_data = 1, sigma = 0.5 (by hand: s^2 + sd^2 = 1.25): c_skip = 1/1.25, c_out = 0.5/sqrt(1.25) = 1/sqrt(5),
    # c_in = 1/sqrt(1.25) = 2/sqrt(5), lambda = 1.25/0.25
    s = torch.tensor(0.5, dtype=torch.float64)
    assert D.c_skip(s, 1.0).item() == pytest.approx(0.8, rel=1e-12)
    assert D.c_out(s, 1.0).item() == pytest.approx(0.44721359549995794, rel=1e-12)
    assert D.c_in(s, 1.0).item() == pytest.approx(0.89442719099991588, rel=1e-12)
    assert D.loss_weight(s, 1.0).item() == pytest.approx(5.0, rel=1e-12)
    # sigma = 0: the denoiser is the identity (c_skip = 1, c_out = 0) and c_in = 1 / sigma_data
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert (D.c_skip(zero).item(), D.c_out(zero).item(), D.c_in(zero).item()) == (1.0, 0.0, 2.0)
    # at high noise the denoiser ignores its input (c_skip -> 0) and c_out -> sigma_data
    big = torch.tensor(1e4, dtype=torch.float64)
    assert D.c_out(big).item() == pytest.approx(0.5, rel=1e-6) and D.c_skip(big).item() < 1e-8


def test_unit_variance_target():
    """EDM's choice of c_skip, c_out makes the effective training target of F unit-variance (eq. 8 and
    Appendix B.6): c_out^2 = (1 - c_skip)^2 sigma_data^2 + c_skip^2 sigma^2, c_in^2 (sigma^2 + sigma_data^2) = 1,
    and the loss weight is lambda = 1 / c_out^2 (Table 1), at sigma_data = 0.5 and another sigma_data."""
    s = torch.logspace(-3, 2, 50, dtype=torch.float64)
    for sd in (0.5, 0.8):
        lhs = D.c_out(s, sd) ** 2
        rhs = (1 - D.c_skip(s, sd)) ** 2 * sd**2 + D.c_skip(s, sd) ** 2 * s**2
        torch.testing.assert_close(lhs, rhs)
        torch.testing.assert_close(D.c_in(s, sd) ** 2 * (s**2 + sd**2), torch.ones_like(s))
        torch.testing.assert_close(D.loss_weight(s, sd) * D.c_out(s, sd) ** 2, torch.ones_like(s))


# --------------------------------------------------------------------------------------------- sampling steps
# Eq. 5 with the paper's defaults (N = 18 as for CIFAR-10, sigma_min = 0.002, sigma_max = 80, rho = 7), computed
# independently of medhybrid with mpmath at 40 digits: a = 80^(1/7), b = 0.002^(1/7),
# sigma_i = (a + i/(N-1) (b - a))^7, printed with mp.nstr(v, 17). The same values as NVlabs/edm's edm_sampler
# t_steps (generate.py; round_sigma is the identity for EDMPrecond) and k-diffusion's get_sigmas_karras.
EDM_STEPS_18 = [80.0, 57.585984721248158, 40.785573796507958, 28.374584604156837, 19.352452980325221,
                12.910082380757316, 8.4009353090998212, 5.3151945217963789, 3.2568215197655383, 1.9233398370400499,
                1.0881706365452794, 0.5853481231945423, 0.29644228447915726, 0.13951646873101648, 0.059947311235471567,
                0.022934518372333368, 0.0075280199627840704, 0.002]
EDM_STEPS_7 = [80.0, 30.183258054886963, 9.7232013552601265, 2.5152189761471586, 0.46997905799774679,
               0.051532394322817778, 0.002]  # the same computation with N = 7


def test_sampling_sigmas_match_eq5_values():
    s = D.sampling_sigmas(18)
    assert s.shape == (19,) and s.dtype == torch.float64
    assert s[:18].tolist() == pytest.approx(EDM_STEPS_18, rel=1e-12)
    assert s[18].item() == 0.0  # sigma_N = 0
    assert D.sampling_sigmas(7, 0.002, 80.0, 7.0).tolist() == pytest.approx([*EDM_STEPS_7, 0.0], rel=1e-12)


def test_sampling_sigmas_special_cases():
    # N = 2: just the two ends, then 0
    assert D.sampling_sigmas(2, sigma_min=0.01, sigma_max=10.0).tolist() == pytest.approx([10.0, 0.01, 0.0], rel=1e-12)
    # rho = 1 is a linear schedule
    assert D.sampling_sigmas(5, 1.0, 5.0, rho=1.0).tolist() == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], rel=1e-12)
    # rho = 3, by hand: (2 + i/2 (1 - 2))^3 with sigma_max = 8, sigma_min = 1 -> 8, 1.5^3, 1
    assert D.sampling_sigmas(3, 1.0, 8.0, rho=3.0).tolist() == pytest.approx([8.0, 3.375, 1.0, 0.0], rel=1e-12)
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
    # P(sigma < 1) = Phi((0 - P_mean) / P_std) = Phi(1) = 0.8413447 (normal table)
    assert (s < 1.0).double().mean().item() == pytest.approx(0.8413447, abs=0.005)
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
    """log-linear from sigma_min (ratio 0) to sigma_max (ratio 1). Reference values by hand/mpmath:
    ratio 0.5 -> sqrt(0.002 * 80) = 0.4; 0.25 -> 0.002^0.75 80^0.25 = 0.028284271247461901; 0.75 -> 5.6568542494923802."""
    p = D.EDMParams()
    r = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    assert D.mdm_sigma(r, p).tolist() == pytest.approx([0.002, 0.028284271247461901, 0.4, 5.6568542494923802, 80.0], rel=1e-9)
    dense = D.mdm_sigma(torch.linspace(0, 1, 101), p)
    assert bool((dense[1:] > dense[:-1]).all())
    # the conditioning c_noise = ln(sigma)/4 of a mask ratio is linear in the ratio, between ln(0.002)/4 and ln(80)/4
    torch.testing.assert_close(D.c_noise(dense.double()), -1.5536520246055479 + torch.linspace(0, 1, 101, dtype=torch.float64)
                               * (1.0955066586684704 + 1.5536520246055479), rtol=0, atol=1e-5)


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

    out = D.heun_sample(denoise, latents, D.sampling_sigmas(18))
    assert out.dtype == torch.float32 and out.shape == latents.shape
    torch.testing.assert_close(out, torch.full_like(out, c), atol=1e-6, rtol=0)
    assert len(calls) == 35  # the paper's NFE for N = 18 (Table 2, CIFAR-10): 2N - 1, Euler on the last step to sigma = 0
    # the denoiser is asked at each eq. 5 level in turn: the first evaluation at sigma_max
    assert [c_.unique().item() for c_ in calls[:3]] == pytest.approx([80.0, 57.585984721248158, 57.585984721248158], rel=1e-6)


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
    ratio = torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0, 0.3])
    m = D.patch_mask((6, 3, 32, 48), ratio, patch=8, generator=torch.Generator().manual_seed(0))
    assert m.shape == (6, 1, 32, 48) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    # 4 x 6 = 24 patches: the masked fraction is the ratio to within half a patch, exactly for multiples of 1/24
    fractions = m.mean(dim=(1, 2, 3))
    assert fractions.tolist() == pytest.approx([0.0, 6 / 24, 12 / 24, 19 / 24, 1.0, 7 / 24])
    assert bool(((fractions - ratio).abs() <= 0.5 / 24 + 1e-6).all())
    # each 8 x 8 patch (aligned to the grid) is all masked or all visible
    blocks = m.view(6, 1, 4, 8, 6, 8)
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))


def test_patch_mask_has_no_positional_bias():
    """Over many images each patch position is masked about as often as the ratio says (no corner, row or column
    favoured): 4000 images, 16 patches, ratio 0.25 -> each position's rate is 0.25 +- 0.007 (1 s.d.)."""
    m = D.patch_mask((4000, 1, 32, 32), torch.full((4000,), 0.25), 8, generator=torch.Generator().manual_seed(5))
    per_patch = m[:, 0, ::8, ::8].mean(dim=0)
    assert per_patch.shape == (4, 4)
    assert (per_patch - 0.25).abs().max().item() < 0.035  # 5 s.d.


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
