"""Rules of the training loop, each measured on something the test controls."""
import argparse

import pytest
import torch

import celebgen as cg


def ema_lag(decay, steps):
    """Run update_ema against a weight that grows by 1 per step; return {step: how far the EMA lags}."""
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.zero_()
    lags = {}
    for step in range(max(steps) + 1):
        model.weight.data.fill_(step)
        cg.update_ema(ema, model, step, decay)
        lags[step] = step - ema.weight.item()
    return {step: lags[step] for step in steps}


def test_ema_spans_a_tenth_of_the_run_early_and_one_over_one_minus_decay_later():
    """update_ema's docstring: the lag is (step + 1) / 10 during the warm-up, d / (1 - d) after.
    A move by d instead of 1 - d, or no warm-up, changes both numbers."""
    for step, lag in ema_lag(0.9999, [10, 100, 1000]).items():
        assert lag == pytest.approx((step + 1) / 10, rel=1e-3)
    assert ema_lag(0.9, [1000])[1000] == pytest.approx(0.9 / 0.1, rel=1e-3)
    assert ema_lag(0.99, [3000])[3000] == pytest.approx(0.99 / 0.01, rel=1e-3)


def test_validation_times_are_the_quantiles_of_the_training_times():
    """validation_set's docstring: t_k = the (k + 1/2)/n quantile of the training distribution, so the
    fraction of training draws below t_k is (k + 1/2)/n. Images and noise are fixed by the seed."""
    images = [torch.full((3, 4, 4), float(i)) for i in range(20)]
    x1, x0, t = cg.validation_set(images, 16, seed=3, t_mu=-0.8, t_sigma=0.8)
    draws = cg.logit_normal(torch.randn(400_000, generator=torch.Generator().manual_seed(0)), -0.8, 0.8)
    below = (draws[:, None] < t[None, :]).double().mean(0)
    assert torch.allclose(below, (torch.arange(16) + 0.5).double() / 16, atol=0.003)
    assert torch.equal(x1, torch.stack(images[:16]))
    again = cg.validation_set(images, 16, seed=3, t_mu=-0.8, t_sigma=0.8)
    assert torch.equal(again[1], x0) and torch.equal(again[2], t)


@pytest.mark.parametrize("step,expected", [(0, 1e-3 / 100), (49, 0.5e-3), (98, 0.99e-3), (99, 1e-3),
                                           (100, 1e-3), (5000, 1e-3)])
def test_learning_rate_warms_up_linearly_then_stays_constant(step, expected):
    args = argparse.Namespace(lr=1e-3, warmup_steps=100)
    assert cg.learning_rate(step, args) == pytest.approx(expected, rel=1e-12)
