import math

import pytest
import torch
from GDPILiverAnomalyLib.errors import Cancelled, ParameterError
from GDPILiverAnomalyLib.method.diffusion import DiffusionConfig, GaussianDiffusion
from GDPILiverAnomalyLib.method.repaint import SliceNoise, repaint
from GDPILiverAnomalyLib.method.schedule import schedule_counts
from GDPILiverAnomalyLib.method.unet import UNet, UNetConfig


def _analytic_denoiser(diffusion, mean, tau, sigma):
    """Exact noise predictor for images x0 = c * 1 + sigma * n, c ~ N(mean, tau^2), n ~ N(0, I).

    The image mean and the residual are independent Gaussians, so E[x0 | x_t] has a
    closed form per component; eps = (x_t - a E[x0 | x_t]) / b.
    """
    base = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False))

    def model(x, t):
        abar = torch.as_tensor(base.alphas_cumprod, dtype=torch.float64)[t].reshape(-1, 1, 1, 1)
        a, b2 = abar.sqrt(), 1 - abar
        x = x.double()
        n = x[0].numel()
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        resid = x - m
        var_mean = tau**2 + sigma**2 / n  # variance of the image mean of x0
        x0_mean = mean + a * var_mean / (a**2 * var_mean + b2) * (m - a * mean)
        x0_resid = a * sigma**2 / (a**2 * sigma**2 + b2) * resid
        x0 = x0_mean + x0_resid
        return ((x - a * x0) / b2.sqrt()).float()

    return model


def _inpaint_constant_images(jump_length, jump_n_sample, steps=50, sampler="repaint"):
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False), steps=steps)
    model = _analytic_denoiser(diffusion, mean=0.0, tau=0.5, sigma=0.02)
    levels = torch.tensor([-0.6, -0.2, 0.3, 0.7]).reshape(4, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    image = levels + 0.02 * torch.randn(4, 1, 16, 16, generator=g)
    mask = torch.zeros(4, 1, 16, 16)
    mask[:, :, 2:14, 2:14] = 1  # 56% of the image is unknown
    out, nfe = repaint(
        model, diffusion, image, mask, jump_length, jump_n_sample, SliceNoise(range(4)),
        sampler=sampler,
    )  # fmt: skip
    hole = out[:, 0, 2:14, 2:14]
    return image, mask, out, nfe, hole, levels.flatten()


def test_repaint_fills_hole_with_the_right_values_and_keeps_known_region():
    # the paper's setting: 250 steps, jump length 10, 10 resamplings
    image, mask, out, nfe, hole, levels = _inpaint_constant_images(10, 10, steps=250)
    assert nfe == 2410
    assert torch.equal(out[mask == 0], image[mask == 0])  # known region exactly the input
    err = (hole.mean(dim=(1, 2)) - levels).abs()
    assert err.max() < 0.05, err  # the hole takes the level its context implies
    std = hole.std(dim=(1, 2))
    assert (std > 0.005).all() and (std < 0.04).all()  # fine texture like the data's 0.02


def test_resampling_harmonizes_better_than_plain_conditioning():
    *_, hole1, levels = _inpaint_constant_images(jump_length=5, jump_n_sample=1)
    *_, hole5, _ = _inpaint_constant_images(jump_length=5, jump_n_sample=5)
    err1 = (hole1.mean(dim=(1, 2)) - levels).abs().mean()
    err5 = (hole5.mean(dim=(1, 2)) - levels).abs().mean()
    assert err5 < err1


def test_ddnm_fills_the_hole_with_fifty_evaluations_where_repaint_cannot():
    """DDNM conditions every clean estimate on the known region: 50 steps without
    resampling find the level the context implies; RePaint with the same 50 network
    evaluations (no resampling) does not."""
    image, mask, out, nfe, hole, levels = _inpaint_constant_images(5, 1, 50, sampler="ddnm")
    assert nfe == 50
    assert torch.equal(out[mask == 0], image[mask == 0])
    ddnm_err = (hole.mean(dim=(1, 2)) - levels).abs().max()
    assert ddnm_err < 0.05, ddnm_err
    std = hole.std(dim=(1, 2))
    assert (std > 0.005).all() and (std < 0.04).all()
    *_, plain, _ = _inpaint_constant_images(5, 1, 50, sampler="repaint")
    assert (plain.mean(dim=(1, 2)) - levels).abs().max() > 2 * ddnm_err


def test_unknown_sampler_is_refused():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False), steps=5)
    image, mask = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    with pytest.raises(ParameterError, match="unknown sampler 'ddim'"):
        repaint(lambda x, t: x, diffusion, image, mask, 1, 1, sampler="ddim")


def _random_unet(learn_sigma=True):
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            image_size=16,
            model_channels=16,
            channel_mult=[1, 2],
            num_res_blocks=1,
            attention_resolutions=[8],
            num_heads=2,
            learn_sigma=learn_sigma,
        )
    )
    for p in net.parameters():  # make the random network's output far from zero
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


@pytest.mark.parametrize("sampler", ["repaint", "ddnm"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_known_region_exact_with_a_real_network(learn_sigma, sampler):
    net = _random_unet(learn_sigma)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=learn_sigma), steps=8)
    image = torch.rand(3, 1, 16, 16) * 2 - 1
    mask = (torch.rand(3, 1, 16, 16) > 0.7).float()
    out, nfe = repaint(net, diffusion, image, mask, 2, 2, SliceNoise([1, 2, 3]), sampler=sampler)
    assert torch.equal(out[mask == 0], image[mask == 0])
    assert not torch.equal(out[mask == 1], image[mask == 1])
    assert out.abs().max() <= 1
    assert nfe == schedule_counts(8, 2, 2)[0]


@pytest.mark.parametrize("sampler", ["repaint", "ddnm"])
def test_deterministic_and_independent_of_batch_composition(sampler):
    net = _random_unet()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(), steps=6)
    image = torch.rand(3, 1, 16, 16) * 2 - 1
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    a, _ = repaint(net, diffusion, image, mask, 2, 2, SliceNoise([10, 11, 12]), sampler=sampler)
    b, _ = repaint(net, diffusion, image, mask, 2, 2, SliceNoise([10, 11, 12]), sampler=sampler)
    assert torch.equal(a, b)
    single, _ = repaint(
        net, diffusion, image[1:2], mask[1:2], 2, 2, SliceNoise([11]), sampler=sampler
    )
    assert torch.allclose(single, a[1:2], atol=1e-4)
    other, _ = repaint(net, diffusion, image, mask, 2, 2, SliceNoise([20, 21, 22]), sampler=sampler)
    assert not torch.allclose(other, a)


def test_progress_and_cancellation():
    net = _random_unet()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(), steps=6)
    image = torch.zeros(1, 1, 16, 16)
    mask = torch.ones(1, 1, 16, 16)
    seen = []
    repaint(net, diffusion, image, mask, 2, 2, progress=lambda n, total: seen.append((n, total)))
    total = schedule_counts(6, 2, 2)[0]
    assert seen == [(n, total) for n in range(1, total + 1)]
    calls = []
    with pytest.raises(Cancelled):
        repaint(
            net,
            diffusion,
            image,
            mask,
            2,
            2,
            should_cancel=lambda: len(calls) > 2,
            progress=lambda n, t: calls.append(n),
        )
    assert len(calls) == 3


def test_accepts_any_callable_model():
    """A third-party network is just a callable ``model(x_t, t)`` with C or 2C channels."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False), steps=5)
    image = torch.full((2, 1, 8, 8), 0.25)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    out, nfe = repaint(lambda x, t: torch.zeros_like(x), diffusion, image, mask, 1, 1)
    assert nfe == 5 and math.isfinite(out.sum().item())
