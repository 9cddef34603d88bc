"""How a training run stops before its end: SIGINT/SIGTERM, and the one line that says what was kept.

`Stop` turns SIGTERM (a cluster preempting the job, torchrun stopping its workers) and SIGINT (Ctrl-C) into a stop
at the end of the step in flight, in every process, and knows the run's phase ("setup", "training", "score") and
which step latest.pt holds, so that each way of stopping says what is true: nothing saved yet; stopped at step N,
continue with --resume; training finished and only the end-of-run score was lost; a rank blocked in a collective.
A process stopped by a signal exits with 128 + its number, as a shell reports it (exit_code). `pause_for_test` is
the tests' hook for choosing the moment of a signal by a job's progress rather than by the clock.
"""
import os
import signal
import sys
import threading

import cli

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(name):
    """The exit status of a process stopped by signal `name` ("SIGTERM" -> 143), as a shell reports it."""
    return 128 + signal.Signals[name].value


class NonFiniteLoss(Exception):
    """The loss stopped being a number; the weights were not updated with it."""


class Stop:
    """SIGINT and SIGTERM during a run of train.py, with what each way of stopping says.

    In the phase "training" the first signal only asks for a stop (`requested`): the loop finishes the step in
    flight, writes latest.pt and exits. Otherwise it interrupts the main thread (KeyboardInterrupt, turned into the
    line `interrupted` gives), or under torchrun (`at_once`) ends the process with that line: torchrun is stopping
    every worker, and a teardown could wait on a dead one. A watcher thread hears every signal even while the main
    thread is blocked in C++ (a collective whose peer died): it ends the process at once on a second signal, and
    when the first one has not been acted on within grace() seconds.
    """

    def __init__(self, latest, rank=0, at_once=False):
        self.latest, self.rank, self.at_once = latest, rank, at_once
        self.phase = "setup"     # "setup", "training" (a signal asks for a stop), "score" (training has finished)
        self.requested, self.acted, self.leaving = None, threading.Event(), False
        self.saved = None        # the step latest.pt holds (None: nothing saved yet)
        self.step_seconds = 1.0  # what a step takes: a signal unanswered for longer than a few steps is not heard
        self.score_with = ""     # the evaluate.py command that gives the end-of-run score, once training is over

    def grace(self):
        return 10 + 3 * self.step_seconds

    # ------------------------------------------------------------------------------------------- the lines

    def continue_with(self):
        if self.saved is None:
            return "nothing was saved: run the same command again"
        return f"{self.latest} holds step {self.saved}: continue with the same command and --resume (or --resume auto)"

    def score_lost(self, name):
        return (f"training finished at step {self.saved} ({self.latest} holds it); {name} interrupted the end-of-run "
                f"score: for the score, {self.score_with}")

    def give_up(self, name, why):
        """The last word of a process that cannot stop at a step's end ("" for the ranks that say nothing)."""
        if self.phase == "score":
            return self.score_lost(name) if self.rank == 0 else ""
        return f"error: rank {self.rank} stopped by {name} ({why}; blocked in a collective?); {self.continue_with()}"

    def interrupted(self, name):
        """KeyboardInterrupt from signal `name` outside the loop -> cli.Interrupted with the line that says what is
        kept."""
        if self.phase == "score":
            return cli.Interrupted(self.score_lost(name), exit_code(name))
        where = "before the first checkpoint" if self.saved is None else f"at step {self.saved}"
        return cli.Interrupted(f"interrupted by {name} {where}: {self.continue_with()}", exit_code(name))

    def stopped_at(self, step, name):
        """After the loop acted on a signal at `step` (latest.pt written): say so, and end this process."""
        if self.rank == 0:
            print(f"stopped by {name} at step {step}: {self.latest} holds it; continue with the same command and "
                  f"--resume (or --resume auto)", file=sys.stderr, flush=True)
        if self.at_once:  # several processes: no teardown that could wait on a peer
            sys.stdout.flush()
            os._exit(exit_code(name))
        sys.exit(exit_code(name))

    def data_stop(self, why):
        """The data cannot serve the step latest.pt now holds -> the UserError to raise."""
        return cli.UserError(f"{why}. {self.latest} holds step {self.saved}: repair or remove the damaged files (named "
                             f"above), or raise --max_bad_scenes, then continue with the same command and --resume")

    def not_finite(self, e):
        return cli.UserError(f"{e}; stopped without updating the weights. The last good checkpoint is kept: "
                             f"{self.latest} (step {self.saved})")

    # ------------------------------------------------------------------------------------------- the signals

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = signal.set_wakeup_fd(write)  # the C-level handler writes each signal's number here
        self._pipe = read, write
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, kind, value, tb):
        self.leaving = True  # from here a signal is the watcher's: _handler raises nothing into this teardown
        self.acted.set()  # whatever ends the run now says why (an interrupt: its line below)
        then = None  # the handlers restored
        if kind is KeyboardInterrupt or self.requested is not None:
            # Leaving on a signal, a second one (Ctrl-C twice, a scheduler's repeated SIGTERM) must still end the
            # process with its status, not with the default action's death by signal while the line is printed.
            then = _exit_now
        elif self.at_once and kind is not None:
            # A rank leaving on an error: torchrun's SIGTERM, sent as soon as a rank fails, would kill it in the
            # process group's teardown before its line is said; torchrun's SIGKILL still ends a rank that hangs.
            then = signal.SIG_IGN
        for s, old in self._old.items():
            signal.signal(s, then or old)
        signal.set_wakeup_fd(self._wakeup)  # only now: until the handlers changed, the watcher heard every signal
        os.close(self._pipe[1])  # ends the watcher, which must be gone before torch tears the process down
        self._watcher.join(5)
        if kind is KeyboardInterrupt:
            name = str(value) if str(value) in ("SIGINT", "SIGTERM") else "SIGINT"  # _handler names the signal
            raise self.interrupted(name) from None
        return False

    def _handler(self, signum, frame):
        if self.leaving:  # a signal landing in __exit__ (Python runs handlers after signal.signal): the watcher's
            return
        if self.phase != "training":
            # `acted` waits for __exit__: Python drops an exception raised in a __del__ or a weakref callback
            # ("Exception ignored in ..."), and an interrupt lost there must still end the process after grace().
            if self.at_once:
                self._exit(signal.Signals(signum).name, "outside the training loop")
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.requested = self.requested or signal.Signals(signum).name

    def _watch(self):
        heard = 0
        while True:
            try:
                data = os.read(self._pipe[0], 16)
            except OSError:
                data = b""
            if not data:  # __exit__ closed the other end
                os.close(self._pipe[0])
                return
            for signum in data:
                if signum not in SIGNALS:
                    continue
                heard += 1
                name = signal.Signals(signum).name
                if heard == 1:
                    grace = self.grace()
                    threading.Thread(target=self._wait_then_exit, args=(name, grace), daemon=True).start()
                else:
                    self._exit(name, f"a second {name}")

    def _wait_then_exit(self, name, grace):
        if not self.acted.wait(grace):
            self._exit(name, f"{name} not acted on within {grace:.0f} s")

    def _exit(self, name, why):
        text = self.give_up(name, why)
        if text:  # os.write: no lock a blocked thread may hold
            os.write(2, f"\n{text}\n".encode())
        os._exit(exit_code(name))


def _exit_now(signum, frame):
    os._exit(128 + signum)


def pause_for_test(moment):
    """A test's hook: with GQN_TEST_PAUSE=<moment> ("step N": after step N, its checkpoint included; "score": before
    the end-of-run score), the process stops itself (SIGSTOP) there, so that a test can signal, kill or damage a
    running job at a moment chosen by its progress, on a machine of any speed, and then continue it (SIGCONT)."""
    if os.environ.get("GQN_TEST_PAUSE") == moment:
        os.kill(os.getpid(), signal.SIGSTOP)


def worker_ignores_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM to the training process, which stops them when it is done."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
