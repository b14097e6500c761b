"""Training to a time budget: the budget's parsing, the rate as a function of the clock, and the run's schedule from
its arguments (the bad ones refused before anything starts)."""

from __future__ import annotations

import pytest

from fastbert.optim import budget_lr, parse_budget
from fastbert.train.pretrain import BUDGET_STEP_CAP, DEFAULT_STEPS, PretrainArgs, Schedule, TrainingSetupError


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("10m", 600), ("2h", 7200), ("1.5m", 90), ("45", 45)])
def test_budgets_parse_to_seconds(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10d", "unknown unit 'd'"),
        ("0m", "positive"),
        ("-5s", "positive"),
        ("m", "not a number"),
        ("inf", "not a number"),
    ],
)
def test_bad_budgets_are_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(text)


def test_budget_rate_warms_up_then_decays_to_zero_at_the_budget():
    rates = [budget_lr(0, f / 100, 1.0, 0.1) for f in range(101)]
    assert rates[5] == pytest.approx(0.5) and rates[10] == pytest.approx(1.0)
    assert rates[55] == pytest.approx(0.5) and rates[100] == 0.0
    assert all(a <= b for a, b in zip(rates[:10], rates[1:11], strict=True))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    assert 0 < budget_lr(0, 0.0, 1.0, 0.1) < 1e-2  # the first step moves, a little
    assert budget_lr(0, 1.7, 1.0, 0.1) == 0.0  # past the budget: nothing
    assert budget_lr(55, 0.5, 1.0, 0.1, power=0.5) == pytest.approx((5 / 9) ** 0.5)


def test_budget_rate_with_warmup_in_steps_ramps_by_step_and_decays_by_time():
    assert budget_lr(0, 0.0, 1.0, 4) == pytest.approx(0.25)
    assert budget_lr(9, 0.5, 1.0, 4) == pytest.approx(0.5)
    assert budget_lr(1, 0.5, 1.0, 4) == pytest.approx(0.25)


def _schedule(**kw) -> Schedule:
    return Schedule.from_args(PretrainArgs(data="d", out="o", **kw))


def test_schedule_from_arguments():
    plain = _schedule()
    assert (plain.steps, plain.budget, plain.warmup) == (DEFAULT_STEPS, None, 100)
    assert plain.rate(49, 0.0) == pytest.approx(plain.lr * 0.5)  # the clock does not matter without a budget
    budget = _schedule(budget="10m", warmup=0.05)
    assert (budget.steps, budget.budget, budget.warmup) == (BUDGET_STEP_CAP, 600.0, 0.05)
    assert budget.rate(7, 300.0) == pytest.approx(budget.lr * (1 - 0.45 / 0.95))
    capped = _schedule(budget="90s", steps=50, warmup=10)
    assert (capped.steps, capped.budget, capped.warmup) == (50, 90.0, 10)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(budget="10x"), "--budget: budget '10x': unknown unit 'x'"),
        (dict(budget="0s"), "--budget: budget '0s': must be a positive duration"),
        (dict(steps=0), "--steps 0: must be positive"),
        (dict(budget="1m", warmup=2.5), "--warmup 2.5: a whole number of steps"),
    ],
)
def test_bad_schedules_are_refused(kw, message):
    with pytest.raises(TrainingSetupError, match=message):
        _schedule(**kw)
