"""Tests of the template reward: keep these checks when you replace the scorer."""

import pytest
import torch

# Inside rewardkit's repository the template is not installed (tests/test_reward_template.py
# installs a copy and runs these tests there); in your copy, once installed, this always imports.
MyReward = pytest.importorskip("rewardkit_myreward", reason="the template package is not installed").MyReward

PROMPTS = ["a photo of a parrot", "a grey wall"]


def test_shape_and_gradient():
    reward = MyReward()
    x = torch.rand(2, 3, 64, 80, requires_grad=True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (2,)
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_batch_invariance():
    reward = MyReward(resolution=32)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(reward(x[1:], PROMPTS[1:]), reward(x, PROMPTS)[1:], atol=1e-6)


def test_higher_is_better_on_an_obvious_pair():
    reward = MyReward(resolution=32)
    grey = torch.full((1, 3, 32, 32), 0.5)
    stripes = torch.zeros(1, 3, 32, 32)
    stripes[:, 0, :, ::2] = 1.0  # red / black stripes
    stripes[:, 2, :, 1::2] = 1.0  # blue
    assert reward(stripes, ["x"]) > reward(grey, ["x"]) + 0.1


def test_found_through_the_entry_point():
    from rewardkit.plugins import load_registry

    info = load_registry().plugins["reward"]["myreward"]
    assert info.cls is MyReward and info.package == "rewardkit-myreward"
