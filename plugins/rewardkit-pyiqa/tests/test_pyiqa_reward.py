"""rewardkit-pyiqa (offline). Skips when pyiqa (non-commercial licence, ~1.1 GB of deps) is not installed."""

import pytest
import torch

pytest.importorskip("pyiqa")
rewardkit_pyiqa = pytest.importorskip("rewardkit_pyiqa")

from rewardkit.errors import UserError  # noqa: E402

PyIQA = rewardkit_pyiqa.PyIQA
RANDOM_CNNIQA = {"metric": "cnniqa", "metric_options": {"pretrained": None}}  # random weights: no download


def images(n, seed=0, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_differentiable_metric_shape_gradient_batch_invariance():
    torch.manual_seed(0)
    reward = PyIQA(**RANDOM_CNNIQA)
    assert reward.differentiable and not reward.lower_better
    x = images(3).requires_grad_(True)
    scores = reward(x, ["", "", ""])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        alone = reward(x[1:2].detach(), [""])
    assert torch.allclose(alone, scores[1:2].detach(), atol=1e-5)
    assert PyIQA(**RANDOM_CNNIQA, gradient_checkpointing=True).net is reward.net  # built once per process


def test_lower_is_better_metric_is_negated_and_rescaled():
    import pyiqa

    x = images(2, seed=1)
    raw = pyiqa.create_metric("piqe", device="cpu")(x).flatten()  # pyiqa's own value, lower is better
    plain = PyIQA(metric="piqe")
    assert plain.lower_better and plain.score_range == (0.0, 100.0)
    assert torch.allclose(plain(x, ["", ""]), -raw, atol=1e-4)
    rescaled = PyIQA(metric="piqe", rescale=True)
    assert torch.allclose(rescaled(x, ["", ""]), 1 - raw / 100, atol=1e-5)


def test_non_differentiable_metric_evaluates_but_cannot_train():
    from rewardkit.generators.pixels import Pixels
    from rewardkit.optimizer import Optimizer

    reward = PyIQA(metric="piqe")
    assert not reward.differentiable
    scores = reward(images(2), ["", ""])  # evaluation works
    assert scores.shape == (2,) and not scores.requires_grad
    with pytest.raises(UserError, match="not differentiable"):
        Optimizer(generator=Pixels(height=32, width=32), rewards=[reward], prompts=["x"], run={"steps": 1})
    assert PyIQA(metric="piqe", differentiable=True).differentiable  # explicit override


def test_bad_metrics_are_user_errors(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="did you mean 'musiq'"):
        PyIQA(metric="musiqq")
    with pytest.raises(UserError, match="full-reference"):
        PyIQA(metric="psnr")
    with pytest.raises(UserError, match="sets of images"):
        PyIQA(metric="fid")
    with pytest.raises(UserError, match="no bounded score range"):
        PyIQA(metric="pi", rescale=True)  # documented range '~0, ~': unbounded above
    assert rewardkit_pyiqa.parse_score_range("~0, ~100") == (0.0, 100.0)
    assert rewardkit_pyiqa.parse_score_range("1, 10") == (1.0, 10.0) and rewardkit_pyiqa.parse_score_range("0, ~") is None


def test_missing_weights_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as err:
        PyIQA(metric="cnniqa")  # default pretrained weights: not cached here
    assert "cnniqa" in str(err.value) and "pretrained_model_path" in str(err.value)
