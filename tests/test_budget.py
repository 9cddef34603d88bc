"""--train_minutes on a simulated clock: the default job's budget (8.5 minutes, at most 6000 steps, a log every 100
steps and a checkpoint every 500) driven as train.py drives it, by machines whose step time changes during the
run. What a user relies on: the run ends within its budget, a passing hiccup costs almost no steps, and a run
that slowed down gets its steps back when the machine recovers."""
import random

import pytest

import config
from budget import DEFAULT_JOB_SCORES, LATE, StepBudget, expectation, measured_near, refit
from scheduler import learning_rate, pixel_sigma

MINUTES, CAP, LOG, SAVE = 8.5, 6000, 100, 500
LOG_S, SAVE_S = 0.3, 0.5  # seconds a log line (with the test batch) and a checkpoint take


def simulate(step_seconds, minutes=MINUTES):
    """Run train.py's loop on a clock whose steps take step_seconds(step, elapsed) -> (steps done, seconds, how
    often the length changed after it was fixed)."""
    clock = StepBudget(minutes, 0, CAP, LOG, SAVE)
    clock.saved(SAVE_S)
    elapsed, total, done, changes = 0.0, CAP, 0, 0
    while done < total:
        dt = step_seconds(done, elapsed)
        clock.step(done, dt)
        elapsed, done = elapsed + dt, done + 1
        if done % LOG == 0:
            clock.logged(LOG_S)
            elapsed += LOG_S
        if done % SAVE == 0:
            clock.saved(SAVE_S)
            elapsed += SAVE_S
        if clock.due(done) and done < total:
            total = clock.total(done, elapsed)
            clock.fix()
        elif clock.fixed and done % LOG == 0 and done < total:
            new = clock.refit(done, elapsed, total)
            changes += new is not None
            total = new or total
    return done, elapsed, changes


def budget():
    return 60 * MINUTES


def steady(step, elapsed):
    return 0.1


def test_a_steady_machine_spends_its_budget():
    steps, seconds, changes = simulate(steady)
    assert budget() * 0.97 <= seconds <= budget()
    assert 4500 < steps < 5100 and changes == 0


def test_a_wandering_pace_moves_the_length_rarely():
    # a shared machine: each log interval's steps take 100-125 ms (measured on the 2-core EPYC), in random order
    rng = random.Random(0)
    pace = [rng.uniform(0.1, 0.125) for _ in range(CAP // LOG)]
    steps, seconds, changes = simulate(lambda s, t: pace[s // LOG])
    assert budget() * 0.95 <= seconds <= budget() * LATE
    assert changes <= 2  # every change moves the schedules


def test_a_slow_interval_costs_almost_no_steps():
    base, _, _ = simulate(steady)
    # one log interval three times slower (another job's burst), early and late in the run
    for start in (1000, 3000):
        steps, seconds, _ = simulate(lambda s, t: 0.3 if start <= s < start + LOG else 0.1)
        assert seconds <= budget() * LATE
        assert steps >= 0.97 * base  # the last interval's pace alone cut such a run by 26%


def test_a_machine_that_stays_slower_still_ends_on_time():
    for factor in (1.5, 2.0, 3.0):
        steps, seconds, _ = simulate(lambda s, t: 0.1 * factor if t > 120 else 0.1)
        assert seconds <= budget() * LATE, factor
        assert seconds >= budget() * 0.95, factor  # and still spends it


def test_a_run_that_slowed_down_grows_back_when_the_machine_recovers():
    base, _, _ = simulate(steady)
    # twice as slow for a minute and a half, then as before: the length shrinks, then grows back
    steps, seconds, _ = simulate(lambda s, t: 0.2 if 120 < t < 210 else 0.1)
    assert budget() * 0.95 <= seconds <= budget() * LATE
    lost = 90 / 2 / 0.1  # the slow minute and a half did half its steps
    assert steps >= base - 1.1 * lost


def test_the_length_never_passes_its_cap():
    steps, seconds, _ = simulate(lambda s, t: 0.01)  # everything fits
    assert steps == CAP and seconds < budget()


def test_the_first_steps_fix_the_length():
    clock = StepBudget(1.0, 0, 1000, 100, 500)  # 60 s, at most 1000 steps
    for step in range(10, 200):  # the first 10 are warm-up, not timed
        clock.step(step, 0.05)
    assert clock.per_step() == pytest.approx(0.05)
    assert clock.total(200, 12.0) == 1000  # 800 more steps take 40 s: all fit
    assert clock.total(200, 40.0) == 600   # 20 s left: 400 more
    clock.fix()
    assert clock.refit(250, 20.0, 600) is None  # only at a log


def test_a_refit_moves_the_end_not_the_schedules():
    cfg, _ = config.parse_args([])  # the default job: sigma over 0.8 of the run, the learning rate over all of it
    state = config.RunState.start(cfg)
    assert state.schedules(cfg) == (CAP, 0.8 * CAP)  # until the first fit: over the length's bound
    state.fix(cfg, 5000, 90.0)  # what the first fit does
    assert (state.steps, state.schedules(cfg)) == (5000, (5000, 4000))

    class Clock:  # a machine that slowed down by a fifth at step 3000
        def refit(self, done, elapsed, total):
            return 4000

    class OneProcess:
        def broadcast(self, value):
            return value

    said = []
    assert refit(cfg, state, Clock(), OneProcess(), said.append, 3000, 300.0)
    assert (state.steps, state.schedules(cfg)) == (4000, (5000, 4000))
    assert "the run ends at step 4000" in said[0]
    # sigma at every step is what it was before the refit: the shortened run still ends at its final sigma
    lr_n, sigma_n = state.schedules(cfg)
    assert pixel_sigma(3999, cfg.sigma_i, cfg.sigma_f, sigma_n) == pytest.approx(0.4, abs=1e-3)
    assert learning_rate(3999, cfg.lr_i, cfg.lr_f, lr_n) == pytest.approx(learning_rate(3999, 2e-3, 2e-4, 5000))


def test_the_default_job_says_what_its_length_has_scored():
    for n, score in DEFAULT_JOB_SCORES:  # a measured length gives what was measured
        assert measured_near(n) == [(n, score)] and f"of {n} steps scored {score:.2f}x" in expectation(n)
    (n0, s0), (n1, s1) = DEFAULT_JOB_SCORES[:2]
    assert measured_near((n0 + n1) // 2) == [(n0, s0), (n1, s1)]  # between two: both
    assert f"of {n0} and {n1} steps scored {s0:.2f}x and {s1:.2f}x" in expectation(n0 + 1)
    assert all(measured_near(n) for n in range(n0, CAP + 1))  # the budget's whole range is covered
    assert measured_near(n0 - 1) == [] and "expect a worse score" in expectation(201)
