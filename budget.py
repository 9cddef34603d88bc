"""A run that fits a time budget: time the first steps on this machine, then fix the number of gradient steps.

The default job has to finish in the same wall time on every 2-core CPU, and CPUs differ twofold (a step of the
`cpu` preset costs about 1.8x more on an AVX2-only EPYC than on one with AVX-512). With --train_minutes M the run
trains normally for its first CALIBRATION steps, measures what a step costs here (data, forward, backward, Adam, and
its share of the test-set logging and checkpoints, each timed after its first, which builds kernels once), and
fixes the run's length to what fits into M minutes, never more than the --gradient_steps it was given. The
annealing schedules (scheduler.py) that span "the whole run" or a share of it are resolved to counts at the same
moment; the run's state (config.RunState) holds them and config.json and every checkpoint save it, so a resumed run
follows the same schedule; the steps
before the decision anneal as if the run were its upper bound long. At every later log the clock refits the length
to the time left at the pace of the median of the last PACE_INTERVALS log intervals: one slow interval (another
job's burst, a slow file system) changes nothing, a machine that stays slower ends the run sooner, and when it
speeds up again the length grows back, never past the upper bound. A refit moves only the end: the schedules keep
the counts of the first fit, since moving σ and the learning rate mid-run disturbs training (the `cpu` preset
anneals σ over 0.8 of the run, so a run cut by up to a fifth still ends at its final σ). Without a budget the same
clock says, after the first steps, what a step costs here and when the run will end.
"""
import math
import statistics

CALIBRATION = 200  # steps trained before the count is fixed: two logs, the second (warm) one timed too
WARMUP = 10        # first steps left out of the timing (oneDNN builds its kernels, the allocator grows)
FIRST_WORD = 3     # without a budget: say what a step costs after this many (one step may take minutes)
PACE_INTERVALS = 5  # log intervals whose median step time is the pace: a slowdown must last 3 to move it
LATE = 1.05        # a run that would end later than this times its budget is shortened
EARLY = 0.95       # ... and one that would end before this, lengthened: between the two it is left alone
                   # (a machine's pace wanders by 10-20%, and every change is said on the console)
# What default jobs (the preset's seed 0) scored by their length: RMSE over the mean training image's, one draw at 3
# context views, 500 test scenes, as train.py scores it at the end; the preset of 1a95525 (z on 2x2) on the AVX2
# EPYC: a 3000-step run on one core and a fresh clone's default job, which fixed 4735 steps and ended at 4729
# (docs/default-run.md#result). Seed 1 scored 0.654 where seed 0 scored 0.679 after 3000 steps; a user is told the
# nearest measured lengths, not a curve.
DEFAULT_JOB_SCORES = ((3000, 0.679), (4729, 0.624))


class StepBudget:
    """Times the steps of a run with --train_minutes and says how many fit. Only rank 0's clock counts."""

    def __init__(self, minutes, start, cap, log_interval, save_interval):
        self.seconds, self.start, self.cap = 60.0 * minutes, start, cap
        self.intervals = (log_interval, save_interval)
        self.warmup = WARMUP if minutes else 1
        # a resumed run times at least 20 steps of its own
        self.decide_at = start + (max(CALIBRATION, WARMUP + 20) if minutes else FIRST_WORD)
        self.times = []       # seconds of each timed step (its loop iteration, without logging or saving)
        self.extra = [0.0, 0.0]  # seconds of the last log and checkpoint
        self.fixed = False    # the length is fixed; from then on `recent` holds the steps since the last log
        self.recent = []
        self.paces = []       # mean step time of each log interval since the first steps (theirs included)

    def step(self, step, seconds):
        if step >= self.start + self.warmup:
            (self.recent if self.fixed else self.times).append(seconds)

    def logged(self, seconds):
        self.extra[0] = seconds

    def saved(self, seconds):
        self.extra[1] = seconds

    def due(self, done):
        return done == self.decide_at

    def per_step(self, times=None):
        """Seconds a step costs here (over `times`, default the timed first steps), logging and checkpoints spread
        over their intervals."""
        times = self.times if times is None else times
        return sum(times) / max(1, len(times)) + sum(e / n for e, n in zip(self.extra, self.intervals))

    def fix(self):
        """The length is fixed: the timed first steps count as paces of their log intervals."""
        n = self.intervals[0]
        self.paces = [statistics.fmean(self.times[i:i + n]) for i in range(0, len(self.times), n)] or [0.0]
        self.fixed = True

    def refit(self, done, elapsed, total):
        """At a log after the length is fixed: the run's new length if the time left at today's pace (the median of
        the last PACE_INTERVALS intervals' step times) says it would end more than 5% past its budget or more than
        5% before it (then up to the cap); else None."""
        if not (self.fixed and self.recent and done % self.intervals[0] == 0):
            return None
        self.paces.append(statistics.fmean(self.recent))
        self.recent = []
        per_step = self.per_step([statistics.median(self.paces[-PACE_INTERVALS:])])
        fits = max(done + 1, min(self.cap, done + math.floor(max(0.0, self.seconds - elapsed) / per_step)))
        if elapsed + (total - done) * per_step > LATE * self.seconds:
            return min(fits, total - 1)
        if elapsed + (total - done) * per_step < EARLY * self.seconds and fits > total:
            return fits
        return None

    def total(self, done, elapsed):
        """The run's gradient steps: what fits into the budget after `done` steps, `elapsed` seconds of them in this
        process (a resumed run's earlier steps are counted at today's cost), and at least one more."""
        spent = elapsed + (self.start * self.per_step())
        more = math.floor(max(0.0, self.seconds - spent) / self.per_step())
        return max(done + 1, min(self.cap, done + more))


def fix_length(cfg, state, clock, dist, say, done, elapsed, on_cpu, default_job=False):
    """After the first steps: with --train_minutes, fix the run's length to what fits (rank 0's clock, sent to every
    rank) in `state`, and for the default job say what that length has scored; without, say what a step costs and
    when the run will end. -> whether the state changed. `say` writes a line on rank 0."""
    per_step = dist.broadcast(clock.per_step())
    if not clock.seconds:
        left = (state.steps - done) * per_step
        say(f"note: a step takes {1000 * per_step:.0f} ms here (with logging and checkpoints): the "
            f"{state.steps - done} steps left take about {duration(left)}" +
            ("; for a run sized for a CPU: the same command with --preset cpu" if on_cpu and left > 3600 and
             cfg.preset != "cpu" else ""))
        return False
    total = dist.broadcast(clock.total(done, elapsed))
    state.fix(cfg, total, round(1000 * per_step, 1))
    clock.fix()
    say(f"Timed the first {done} steps: {state.timed_ms:.0f} ms a step here, with logging and checkpoints; "
        f"{total} steps fit into --train_minutes {cfg.train_minutes:g} (at most {clock.cap}), so the run takes "
        f"{total} steps (config.json: state)")
    if default_job:
        say(expectation(total))
    if total < 2 * done:  # the timed steps annealed as if the run were clock.cap long: most of the anneal is left
        say(f"note: the {done} timed steps are most of this run, and they annealed σ and the learning rate as if it "
            f"were {clock.cap} steps long; for a run this short, give --gradient_steps instead of --train_minutes")
    return True


def measured_near(steps, table=DEFAULT_JOB_SCORES):
    """The measured (steps, score) of the lengths nearest `steps`: the one it equals, or the two around it; [] below
    the shortest."""
    if steps < table[0][0]:
        return []
    for (n0, s0), (n1, s1) in zip(table, table[1:]):
        if steps in (n0, n1):
            return [(steps, s0 if steps == n0 else s1)]
        if n0 < steps < n1:
            return [(n0, s0), (n1, s1)]
    return [table[-1]]


def expectation(steps):
    """The line a default job prints once its length is fixed: what default jobs of about its length scored."""
    near = measured_near(steps)
    if not near:
        n, s = DEFAULT_JOB_SCORES[0]
        return (f"{steps} steps are fewer than the shortest default job measured ({n} steps scored {s:.2f}x the mean "
                f"image's RMSE): expect a worse score")
    runs = " and ".join(f"{n}" for n, _ in near)
    scores = " and ".join(f"{s:.2f}x" for _, s in near)
    return (f"default jobs of {runs} steps scored {scores} the mean image's RMSE (one draw at 3 context views; "
            f"another seed moved a score by 0.01: docs/speed.md)")


def duration(seconds):
    """'3.3 years', '12 days', '3 h 05 min', '12 min' or '40 s'."""
    seconds = int(round(seconds))
    if seconds >= 365 * 86400:
        return f"{seconds / (365 * 86400):.1f} years"
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"


def refit(cfg, state, clock, dist, say, done, elapsed):
    """At each log of a run whose length is fixed: end it sooner if the machine slowed down, later (up to the cap)
    if it sped up again (clock.refit); the schedules keep the counts the first fit gave them. -> whether the state
    changed."""
    old = state.steps
    total = dist.broadcast(clock.refit(done, elapsed, old))
    if total is None:
        return False
    state.steps = total
    say(f"The steps have slowed down: {old} would end past --train_minutes {cfg.train_minutes:g}, so the run ends "
        f"at step {total} (config.json: state)" if total < old else
        f"The steps are faster again: the run ends at step {total} instead of {old} (config.json: state)")
    return True
