"""R0's K-step sampler on its own (rewardkit/sampler.py): a predict callable, no pipeline."""

from __future__ import annotations

import torch

from rewardkit import sampler

ALPHA = torch.tensor([0.1, 0.5, 0.8, 0.95])  # alpha rises, sigma falls: steps go from noisy to clean
SIGMA = (1 - ALPHA**2).sqrt()


def test_with_an_exact_denoiser_and_eta_zero_every_step_lands_on_the_data():
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    visited = []

    def predict(x, k):  # the exact posterior mean of a point mass: x0, and the noise that explains x_t
        visited.append(k)
        return x0, (x - ALPHA[k] * x0) / SIGMA[k]

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    trajectory = []
    out = sampler.sample(predict, noise, ALPHA, SIGMA, eta=0.0, trajectory=trajectory)
    torch.testing.assert_close(out, x0)
    assert visited == [0, 1, 2, 3] and len(trajectory) == 4
    # DDIM at eta = 0 keeps the first step's noise estimate z: x_t = alpha_t x0 + sigma_t z at every later step
    z = (noise - ALPHA[0] * x0) / SIGMA[0]
    torch.testing.assert_close(trajectory[0], noise)
    for k in range(1, 4):
        torch.testing.assert_close(trajectory[k], ALPHA[k] * x0 + SIGMA[k] * z, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_exactly_the_steps_asked_for():
    weights = torch.nn.Parameter(torch.ones(4))

    def predict(x, k):  # step k scales by its own weight, so d out / d weights[k] != 0 iff step k is on the graph
        x0 = weights[k] * x
        return x0, x - x0

    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))

    def grads(**kw):
        weights.grad = None
        sampler.sample(predict, noise, ALPHA, SIGMA, **kw).sum().backward()
        return (weights.grad != 0).tolist()

    assert grads() == [True, True, True, True]
    assert grads(grad_steps=2) == [False, False, True, True]
    assert grads(supervise_step=1) == [False, True, False, False]  # R0+: earlier steps without gradient, later ones not run
    assert grads(supervise_step=torch.tensor([1, 2])) == [False, True, True, False]
    assert grads(supervise_step=2, grad_to_noise=True) == [True, True, True, False]
