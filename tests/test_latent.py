"""Scores that tell a collapsed latent from a used one (metrics.draw_scores, evaluate.py --samples N), on constructed
draws whose answer is known, on a model that draws the same image every time, and on the default job's model from
before the latent was made to work (tests/data/collapsed_default_run.pt), which they must call collapsed."""
import os

import pytest
import torch

import evaluate
from conftest import ROOT, make_checkpoint, make_data
from gqn_dataset import GQNDataset
from metrics import FRACTIONS, draw_scores, sparsification
from model import GQN

FAR = torch.full((3, 8, 8), -1000.0)  # a reference no pixel is near: every pixel informative


def constructed(spread_of, seed=0, B=4, N=2):
    """Truth, and N draws whose per-pixel spread is spread_of(error) around a mean with a random error."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(B, 3, 8, 8, generator=g) * 255
    error = torch.rand(B, 1, 8, 8, generator=g) * 40  # the same in every colour: per-pixel RMS = error
    mean = truth + error
    spread = spread_of(error, g)
    sign = torch.tensor([1.0, -1.0] * (N // 2))[:, None, None, None, None]
    return mean + sign * spread, truth


def summary(draws, truth, reference=FAR):
    scores, curves = draw_scores(draws, truth, reference)
    model, oracle = curves["model"].mean(0), curves["oracle"].mean(0)
    ause, random = (model - oracle).mean().item(), (1 - oracle).mean().item()
    return scores, ause / random


def test_a_spread_equal_to_the_error_is_perfect():
    draws, truth = constructed(lambda error, g: error)
    scores, ause_ratio = summary(draws, truth)
    assert ause_ratio == pytest.approx(0, abs=1e-9)  # removing the most uncertain pixels removes the worst ones
    assert scores["spearman"] == pytest.approx(torch.ones(4, dtype=torch.float64))
    assert scores["spread_i"] == pytest.approx(scores["error_i"])  # spread / error 1: calibrated
    assert (scores["in_2sd"] == 1).all()  # the truth one spread from the draws' mean


def test_a_constant_spread_or_one_unrelated_to_the_error_is_uninformative():
    draws, truth = constructed(lambda error, g: torch.full_like(error, 7.0))
    scores, ause_ratio = summary(draws, truth)
    assert ause_ratio == pytest.approx(1.0)  # ties leave together: a random order's flat curve
    assert (scores["spearman"] == 0).all()  # a constant ranks nothing
    draws, truth = constructed(lambda error, g: torch.rand(error.shape, generator=g) * 40, B=64)
    scores, ause_ratio = summary(draws, truth)
    assert ause_ratio == pytest.approx(1.0, abs=0.1) and abs(scores["spearman"].mean()) < 0.05


def test_sparsification_of_known_pixels():
    error = torch.tensor([4.0, 3.0, 0.0, 0.0] * 5)
    by_error = sparsification(error, error)
    assert by_error[0] == 1 and by_error[int(0.5 * len(FRACTIONS))] == 0  # the ten errors gone, the zeros left
    backwards = sparsification(-error, error)  # the most uncertain are the exact ones: the rest gets worse
    assert (backwards[1:] >= 1).all()


@pytest.fixture
def scenes(tmp_path):
    make_data(tmp_path / "test", scenes=6)
    return GQNDataset(tmp_path / "test")


def test_a_deterministic_model_is_reported_as_such_without_dividing_by_zero(scenes, tmp_path):
    model, _ = evaluate.load_model(make_checkpoint(tmp_path / "c.pt"))
    with torch.no_grad():  # the prior's log std far below float32's resolution: every draw is the prior's mean
        model.prior.bias[model.z_dim:] = -60.0
    baseline = evaluate.mean_image(scenes, 16, progress=False)
    r = evaluate.evaluate(model, scenes, 2, samples=4, baseline=baseline, progress=False)
    assert r["latent"] == "deterministic" and r["deterministic"] and r["spread"] == 0
    assert r["best_of_ratio"] == 1 and r["spread_to_error"] == 0 and r["ause_ratio"] == pytest.approx(1)
    # every score of the draws a number, the NLL too (the 8-bit quantisation floors the variance); the ELBO's KL is
    # infinite, truly: the prior's std is 1e-26
    assert all(torch.isfinite(torch.tensor(r[key])) for _, key, _ in evaluate.DRAW_LINES)
    again = evaluate.evaluate(model, scenes, 2, samples=4, baseline=baseline, progress=False)
    assert again == r  # the same seed: the same scores


def test_the_collapsed_default_run_is_reported_as_collapsed(tmp_path):
    """The default job's model of 418d2ef (KL 0.013 nats at 3 views): its first 24 test scenes, exactly as the
    default job rendered them (the renderer is a pure function of seed, split and scene)."""
    from dataset.shepard_metzler import render_dataset

    ckpt = torch.load(os.path.join(ROOT, "tests", "data", "collapsed_default_run.pt"), weights_only=True)
    model = GQN(**ckpt["model_config"])
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    model.eval()
    train, test = render_dataset(str(tmp_path / "sm"), 100, 24, parts=5, seed=0, progress=False)
    baseline = evaluate.mean_image(GQNDataset(train), 32, progress=False)
    for context in (1, 3):
        r = evaluate.evaluate(model, GQNDataset(test), context, seed=0, samples=8, baseline=baseline,
                              progress=False)
        assert r["latent"] == "collapsed", (context, r["best_of_ratio"], r["spread_to_error"])
        assert r["kl"] < 0.5 and r["spread_to_error"] < 0.05 and r["best_of_ratio"] > 0.99
        assert len(r["kl_per_step"]) == 4 and sum(r["kl_per_step"]) == pytest.approx(r["kl"], rel=1e-6)
