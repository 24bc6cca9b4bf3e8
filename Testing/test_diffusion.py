import math

import numpy as np
import pytest
import torch
from GDPILiverAnomalyLib.errors import ParameterError
from GDPILiverAnomalyLib.method.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    beta_schedule,
    space_timesteps,
)


def test_linear_schedule_is_the_papers():
    betas = beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)


def test_cosine_schedule_follows_alpha_bar():
    betas = beta_schedule("cosine", 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert np.cumprod(1 - betas)[499] == pytest.approx(f(500 / 1000) / f(0), rel=1e-6)
    assert betas.max() <= 0.999


def _reference_spacing(T, n):
    """improved-diffusion's space_timesteps for one section: accumulate a fractional stride."""
    stride, cur, out = (T - 1) / (n - 1), 0.0, []
    for _ in range(n):
        out.append(round(cur))
        cur += stride
    return out


@pytest.mark.parametrize("n", [2, 10, 50, 100, 250, 333, 1000])
def test_space_timesteps_matches_reference(n):
    assert space_timesteps(1000, n) == _reference_spacing(1000, n)


def test_respaced_chain_keeps_alphas_cumprod_and_original_timesteps():
    cfg = DiffusionConfig()
    base = GaussianDiffusion.from_config(cfg)
    resp = GaussianDiffusion.from_config(cfg, steps=250)
    use = space_timesteps(1000, 250)
    assert resp.num_timesteps == 250 and resp.timestep_map == use
    assert np.allclose(resp.alphas_cumprod, base.alphas_cumprod[use], rtol=1e-12)
    # beta_t = 1 - abar_t / abar_{t-1} on the respaced chain
    assert resp.betas[1] == pytest.approx(
        1 - base.alphas_cumprod[use[1]] / base.alphas_cumprod[use[0]]
    )
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    resp.p_mean_variance(model, torch.zeros(1, 1, 4, 4), 100)
    assert seen == [use[100]]
    with pytest.raises(ParameterError):
        space_timesteps(1000, 1001)


def test_learned_range_interpolates_on_the_respaced_chain():
    resp = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=True), steps=50)
    t = 20
    abar, abar_prev, beta = resp.alphas_cumprod[t], resp.alphas_cumprod[t - 1], resp.betas[t]
    post_var = beta * (1 - abar_prev) / (1 - abar)
    x = torch.zeros(1, 1, 2, 2)
    for v, expected in [
        (1.0, math.log(beta)),
        (-1.0, math.log(post_var)),
        (0.0, 0.5 * math.log(beta) + 0.5 * math.log(post_var)),
    ]:
        out = resp.p_mean_variance(
            lambda x, tt, v=v: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1), x, t
        )
        assert out.log_variance.flatten()[0].item() == pytest.approx(expected, rel=1e-5)
    # t = 0: the posterior variance is 0, so its log is clipped to the t = 1 value
    out = resp.p_mean_variance(
        lambda x, tt: torch.cat([torch.zeros_like(x), -torch.ones_like(x)], 1), x, 0
    )
    assert out.log_variance.flatten()[0].item() == pytest.approx(
        math.log(resp.posterior_variance[1]), rel=1e-5
    )


def test_posterior_mean_and_x0_prediction_are_consistent():
    """With the true noise as model output, pred_x0 recovers x0 and the mean is the q posterior mean."""
    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=False), steps=100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 1.6 - 0.8
    eps = torch.randn(2, 1, 8, 8, generator=g)
    t = 60
    xt = d.q_sample(x0, t, eps)
    out = d.p_mean_variance(lambda x, tt: eps, xt, t)
    assert torch.allclose(out.pred_xstart, x0, atol=1e-5)
    c1 = d.betas[t] * math.sqrt(d.alphas_cumprod[t - 1]) / (1 - d.alphas_cumprod[t])
    c2 = (1 - d.alphas_cumprod[t - 1]) * math.sqrt(1 - d.betas[t]) / (1 - d.alphas_cumprod[t])
    assert torch.allclose(out.mean, c1 * x0 + c2 * xt, atol=1e-5)
    assert out.log_variance.shape == xt.shape


def test_model_with_wrong_channel_count_is_refused():
    d = GaussianDiffusion.from_config(DiffusionConfig(), steps=10)
    with pytest.raises(ParameterError, match="channels"):
        d.p_mean_variance(lambda x, t: torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), 5)


class _TwoParamModel(torch.nn.Module):
    """out = [noise guess scaled by a, variance value b]: lets a test see where gradients go."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise
        self.a = torch.nn.Parameter(torch.tensor(0.9))
        self.b = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, x, t):
        return torch.cat([self.a * self.noise, self.b * torch.ones_like(x)], dim=1)


def test_hybrid_loss_terms():
    from GDPILiverAnomalyLib.method.diffusion import training_losses

    d = GaussianDiffusion.from_config(DiffusionConfig(learn_sigma=True))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 1.6 - 0.8
    noise = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    model = _TwoParamModel(noise)
    terms = training_losses(d, model, x0, t, noise)
    assert terms["mse"][0].item() == pytest.approx(((0.1 * noise[0]) ** 2).mean().item(), rel=1e-5)
    assert (terms["vb"][1:] >= 0).all()  # a KL divergence
    # the variational term trains only the variance: no gradient into the noise prediction
    terms["vb"].sum().backward()
    assert model.a.grad.abs().item() == 0 and model.b.grad.abs().item() > 0
    # the exact noise and the true posterior variance (v = -1) give KL = 0 for t > 0
    model.a.data.fill_(1.0)
    exact = training_losses(d, model, x0, t, noise)
    assert torch.allclose(exact["vb"][1:], torch.zeros(3), atol=1e-4)
    assert torch.allclose(exact["loss"], exact["mse"] + 0.001 * 1000 * exact["vb"])
