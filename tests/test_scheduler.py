"""The paper's schedules at their key steps (Eslami et al. 2018, supplementary "Training")."""
import math

import pytest

from scheduler import learning_rate, pixel_sigma


def test_learning_rate_paper_key_steps():
    assert learning_rate(0) == pytest.approx(5e-4)
    assert learning_rate(800_000) == pytest.approx((5e-4 + 5e-5) / 2)  # linear: halfway at half of 1.6M
    assert learning_rate(1_600_000) == pytest.approx(5e-5)
    assert learning_rate(2_000_000) == pytest.approx(5e-5)  # flat after the annealing
    steps = [0, 1, 1000, 400_000, 1_599_999, 1_600_000, 1_600_001]
    values = [learning_rate(s) for s in steps]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_pixel_sigma_paper_key_steps():
    assert pixel_sigma(0) == pytest.approx(2.0)
    assert pixel_sigma(100_000) == pytest.approx(1.35)
    assert pixel_sigma(200_000) == pytest.approx(0.7)
    assert pixel_sigma(1_000_000) == pytest.approx(0.7)
    # The Gaussian's constant at the final sigma: 6909 nats for a 64x64x3 image.
    floor = 64 * 64 * 3 * (math.log(pixel_sigma(200_000)) + 0.5 * math.log(2 * math.pi))
    assert floor == pytest.approx(6909, abs=1)


def test_custom_schedules():
    assert learning_rate(50, lr_i=1e-3, lr_f=1e-4, n=100) == pytest.approx(5.5e-4)
    assert pixel_sigma(10, sigma_i=1.0, sigma_f=0.5, n=0) == 0.5  # n = 0: the final value from the start
    assert pixel_sigma(-5) == pytest.approx(2.0)
