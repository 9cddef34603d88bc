"""Long runs: --resume compares meanings, --resume auto, preemption (SIGTERM/SIGINT) loses no step, torchrun's elastic
restarts, runs that move and fit on disk, damaged checkpoints, interruptions that say what is true."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import config
import train
from conftest import (ROOT, args, main_error, paused_env, proc_state, rank_pid, signal_pending, tiny_default_job,
                      torchrun, wait_paused, wait_until, weights)


def same_weights(a, b, atol=1e-5):
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=atol, rtol=0)


def start(argv, cwd, pause):
    """train.py in a process group of its own, as a shell starts a job (Ctrl-C reaches it and its workers), stopping
    itself at `pause` ("step N" or "score"): -> the process, once paused there."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=cwd, env=paused_env(pause),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_paused(proc.pid, proc)
    return proc


def signal_paused(pids, sig, send):
    """send() a signal to paused processes; once it is pending in each, continue them: it lands where they stopped."""
    send()
    wait_until(lambda: all(signal_pending(pid, sig) for pid in pids), f"{sig.name} pending")
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


# ------------------------------------------------------------------------------------------------ --resume

def test_resume_compares_meanings_not_spellings(data, tmp_path, capsys):
    first = args(data, tmp_path, "run", 3, "--dataset", "Shepard-Metzler", "--shared_core", "False", "--lr_i", "5e-4")
    train.main(first)
    assert weights(tmp_path / "run")["config"]["dataset"] == "shepard_metzler_3_parts"
    # the same command line, other spellings of the same values, and more steps
    again = args(data, tmp_path, "run", 6, "--dataset", "shepard-metzler", "--shared_core", "0", "--lr_i", "0.00050",
                 "--resume")
    train.main(again)
    assert "Resuming" in capsys.readouterr().out and weights(tmp_path / "run")["step"] == 6
    err = main_error(train.main, args(data, tmp_path, "run", 9, "--dataset", "Jaco", "--resume"), capsys)
    assert "--dataset Jaco differs from the run being resumed (shepard_metzler_3_parts)" in err


def test_resume_auto_starts_a_run_then_continues_it(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "whole", 6))
    train.main(args(data, tmp_path, "auto", 3, "--resume", "auto"))  # nothing there: starts
    assert "Resuming" not in capsys.readouterr().out
    train.main(args(data, tmp_path, "auto", 6, "--resume", "auto"))  # a run there: continues it
    assert f"Resuming {tmp_path / 'auto'} at step 3" in capsys.readouterr().out
    same_weights(weights(tmp_path / "whole"), weights(tmp_path / "auto"))
    err = main_error(train.main, args(data, tmp_path, "x", 3, "--resume", "sometimes"), capsys)
    assert "--resume: expected True/False/1/0 or auto" in err


def test_a_checkpoint_of_an_earlier_version_resumes_and_ends_as_that_version_did(data, tmp_path):
    """tests/data/resume_dc16b8c: step 3 of a 6-step run (conftest's `args` and a smaller GQN) written by the code of
    dc16b8c, whose checkpoints kept the run's length and schedules in the config, and that run's weights at step 6."""
    kept, smaller = os.path.join(ROOT, "tests", "data", "resume_dc16b8c"), ["--r_dim", "4", "--h_dim", "4", "--u_dim",
                                                                            "4", "--kernel_size", "3"]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(kept, "step_00000003.pt"), tmp_path / "run" / "checkpoints" / "latest.pt")
    train.main(args(data, tmp_path, "run", 6, *smaller, "--resume"))
    now = weights(tmp_path / "run")
    assert now["step"] == 6 and now["state"] == {"steps": 6, "lr_n": 1.6e6, "sigma_n": 2e5, "timed_ms": 0.0}
    same_weights(torch.load(os.path.join(kept, "step_00000006_model.pt"), weights_only=True), now)


def test_keep_checkpoints_keeps_the_newest(data, tmp_path):
    train.main(args(data, tmp_path, "run", 12, "--keep_checkpoints", "2"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest.pt", "step_00000009.pt",
                                                                      "step_00000012.pt"]
    train.main(args(data, tmp_path, "none", 6, "--keep_checkpoints", "0"))
    assert os.listdir(tmp_path / "none" / "checkpoints") == ["latest.pt"]


def test_a_damaged_latest_is_named_with_the_way_back(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "run", 6))
    folder = tmp_path / "run" / "checkpoints"
    latest = folder / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a disk that filled up mid-copy
    for resume in ("True", "auto"):  # never a silent fresh start over a damaged run
        err = main_error(train.main, args(data, tmp_path, "run", 9, "--resume", resume), capsys)
        assert str(latest) in err and "not a loadable checkpoint" in err
        assert f"cp {folder / 'step_00000006.pt'} {latest}" in err
    main_error(evaluate.main, ["--checkpoint", str(latest), "--test_data_dir", data[1], "--device", "cpu"], capsys,
               f"--checkpoint {latest}: not a loadable checkpoint", f"pass --checkpoint {folder / 'step_00000006.pt'}")


def test_the_default_job_resumes_from_any_directory(tmp_path, monkeypatch, capsys):
    tiny_default_job(monkeypatch, tmp_path)
    train.main([])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train.main(["--root_log_dir", str(tmp_path / "runs"), "--resume", "--gradient_steps", "4"])
    assert "Resuming" in capsys.readouterr().out and weights(tmp_path / "runs" / "default")["step"] == 4


def test_the_rooms_job_resumes_with_the_same_command(tmp_path, monkeypatch, capsys):
    tiny_default_job(monkeypatch, tmp_path)
    monkeypatch.setattr(config, "ROOMS_DATA", dict(train_scenes=6, test_scenes=2, seed=0, workers=1))
    train.main(["--builtin", "rooms_ring_camera"])
    assert weights(tmp_path / "runs" / "rooms")["step"] == 2
    train.main(["--builtin", "rooms_ring_camera", "--gradient_steps", "3", "--resume"])  # the same command, resumed
    train.main(["--log_dir", "rooms", "--gradient_steps", "4", "--resume"])  # or the run named alone
    ckpt = weights(tmp_path / "runs" / "rooms")
    assert ckpt["step"] == 4 and ckpt["config"]["builtin"] == "rooms_ring_camera"
    assert "Resuming" in capsys.readouterr().out
    fresh = ["--builtin", "rooms_ring_camera", "--log_dir", "other", "--train_data_dir",
             ckpt["config"]["train_data_dir"], "--test_data_dir", ckpt["config"]["test_data_dir"]]
    main_error(train.main, fresh, capsys, "--builtin rooms_ring_camera: only for a run without data folders")


def test_an_interruption_before_the_first_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    import dataset.builtin as builtin

    tiny_default_job(monkeypatch, tmp_path)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(builtin, "render_dataset", ctrl_c)  # Ctrl-C while the built-in data is rendered
    with pytest.raises(SystemExit) as e:
        train.main([])
    assert e.value.code == 130
    assert "interrupted by SIGINT before the first checkpoint: nothing was saved: run the same command again" in \
        capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data" / "builtin" / "shepard_metzler_3_parts").exists()


# ------------------------------------------------------------------------------------------------ preemption

@pytest.mark.slow
@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, "0"), (signal.SIGINT, "2")])
def test_preemption_loses_no_step(data, tmp_path, sig, workers):
    """SIGTERM (a cluster) or SIGINT (Ctrl-C, DataLoader workers running): the step in flight ends, latest.pt holds
    it, and the same command with --resume auto ends where an uninterrupted run does."""
    run = args(data, tmp_path, "run", 30, "--save_interval", "10", "--log_interval", "5", "--workers", workers,
               "--resume", "auto")
    proc = start(run, tmp_path, "step 15")  # between checkpoints
    # the whole group, DataLoader workers included, as Ctrl-C in a terminal does
    signal_paused([proc.pid], sig, lambda: os.killpg(proc.pid, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, err[-2000:]
    # A signal sent to a process may reach any of its threads: the main thread, continued, may finish the step after
    # the pause before it hears of it. Either way the step in flight is the last.
    step = weights(tmp_path / "run")["step"]
    assert step in (15, 16) and lines[0].startswith(f"stopped by {sig.name} at step {step}:")
    assert "--resume" in lines[0] and "Traceback" not in err
    train.main(run)
    train.main(args(data, tmp_path, "whole", 30, "--save_interval", "10", "--log_interval", "5"))
    same_weights(weights(tmp_path / "whole"), weights(tmp_path / "run"))


@pytest.mark.slow
def test_a_signal_during_the_end_of_run_score_says_training_finished(data, tmp_path):
    run = args(data, tmp_path, "run", 6)
    proc = start(run, tmp_path, "score")
    signal_paused([proc.pid], signal.SIGTERM, lambda: proc.send_signal(signal.SIGTERM))
    _, err = proc.communicate(timeout=60)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert proc.returncode == 143 and weights(tmp_path / "run")["step"] == 6
    assert err.strip().splitlines()[-1] == (
        f"training finished at step 6 ({latest} holds it); SIGTERM interrupted the end-of-run score: for the score, "
        f"python evaluate.py --checkpoint {latest} --test_data_dir {data[1]} --train_data_dir {data[0]}")
    assert not (tmp_path / "run" / "samples.png").exists()


@pytest.mark.slow
def test_tensorboard_drops_what_was_logged_after_the_checkpoint_resumed(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = args(data, tmp_path, "run", 100_000, "--save_interval", "100000", "--log_interval", "3")
    proc = start(run, tmp_path, "step 30")
    proc.kill()  # SIGKILL: latest.pt holds step 0, TensorBoard holds steps 3, 6, ..., 30
    proc.wait()
    assert weights(tmp_path / "run")["step"] == 0
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/elbo")] == list(range(3, 31, 3))
    train.main(args(data, tmp_path, "run", 9, "--save_interval", "100000", "--log_interval", "3", "--resume"))
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/elbo")] == [3, 6, 9]


@pytest.mark.slow
def test_a_second_signal_ends_the_process_at_once(data, tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                             *args(data, tmp_path, "run", 100_000, "--save_interval", "100000")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: os.path.exists(tmp_path / "run" / "checkpoints" / "latest.pt") or proc.poll() is not None,
               "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    # Two signals sent before the process runs again are one signal to the kernel: the second follows the first's
    # delivery, as a user's second Ctrl-C does.
    wait_until(lambda: proc.poll() is not None or not signal_pending(proc.pid, signal.SIGTERM), "SIGTERM delivered")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    # 143 as a shell reports it: the exit status, or death by SIGTERM when the second one lands in the interpreter's
    # own teardown (Python restores the default action there, after the run's last line)
    assert proc.returncode in (143, -signal.SIGTERM), err[-3000:]
    torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)  # still loadable


LOST_INTERRUPT = """
import os, signal, time
import stops

class Dropped:
    def __del__(self):  # the signal lands here: Python prints "Exception ignored in" and goes on
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

stop = stops.Stop("latest.pt")
stop.grace = lambda: 1.0
with stop:
    Dropped()
    print("went on", flush=True)
    time.sleep(60)
"""


def test_a_signal_python_drops_still_ends_the_process():
    r = subprocess.run([sys.executable, "-c", LOST_INTERRUPT], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert "Exception ignored" in r.stderr and "went on" in r.stdout  # the interrupt was lost, as in a weakref cb
    assert r.returncode == 143, r.stderr[-2000:]
    assert "SIGTERM not acted on within 1 s" in r.stderr


RANK_ERROR = """
import os, signal, time
import cli, stops

def run(argv):
    try:
        with stops.Stop("latest.pt", rank=0, at_once=True):
            raise cli.UserError("rank 0: lost contact with the other processes")
    finally:  # the process group's teardown, where torchrun's SIGTERM for the whole job lands
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)

cli.main(run)
"""


def test_a_rank_that_failed_says_why_though_torchrun_stops_it_meanwhile():
    r = subprocess.run([sys.executable, "-c", RANK_ERROR], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert r.returncode == 1 and r.stderr == "error: rank 0: lost contact with the other processes\n", r


# ------------------------------------------------------------------------------------------------ torchrun

def paused_ranks(proc):
    """Both ranks of a torchrun job started with a pause, once each has stopped itself -> their pids."""
    pids = []
    for r in (0, 1):
        wait_until(lambda: proc.poll() is not None or rank_pid(proc, r) is not None, f"rank {r}")
        pids.append(rank_pid(proc, r))
        wait_paused(pids[-1], proc)
    return pids


def preempted(argv, pause, stderr=subprocess.STDOUT):
    """A torchrun job paused at `pause` on both ranks, then SIGTERM to torchrun, which passes it on to every worker,
    and the job continued -> its (stdout, stderr)."""
    cmd, env = torchrun(argv, pause=pause)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        signal_paused(paused_ranks(proc), signal.SIGTERM, lambda: proc.send_signal(signal.SIGTERM))
        return proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_an_uninterrupted_one(data, tmp_path):
    steps = args(data, tmp_path, "run", 60, "--save_interval", "6", "--log_interval", "6", "--resume", "auto")
    # c10d rendezvous: each restart gets a fresh round (a static one hangs); the restarted ranks start at step 13
    cmd, env = torchrun(steps, rdzv=True, pause="step 12")
    cmd.insert(cmd.index("--nproc_per_node"), "--max-restarts")
    cmd.insert(cmd.index("--nproc_per_node"), "1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        zero, one = paused_ranks(proc)
        os.kill(one, signal.SIGKILL)
        os.kill(zero, signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "Resuming" in out and "at step 12" in out and out.count("Done: 60 steps") == 1
    train.main(args(data, tmp_path, "whole", 60, "--save_interval", "6", "--log_interval", "6"))
    same_weights(weights(tmp_path / "whole"), weights(tmp_path / "run"), atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_torchrun_preempted_loses_no_step_and_a_blocked_rank_still_ends(data, tmp_path):
    run = args(data, tmp_path, "run", 40, "--save_interval", "20", "--log_interval", "10", "--resume", "auto")
    out, _ = preempted(run, "step 30")  # the stop flag travels with the next step's sums
    step = weights(tmp_path / "run")["step"]  # 31 or 32: as for one process, and the flag takes one more step
    assert step in (31, 32) and f"stopped by SIGTERM at step {step}:" in out, out[-3000:]
    cmd, env = torchrun(run)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"at step {step}" in r.stdout, r.stderr[-3000:]
    train.main(args(data, tmp_path, "whole", 40, "--save_interval", "20", "--log_interval", "10"))
    same_weights(weights(tmp_path / "whole"), weights(tmp_path / "run"), atol=1e-4)

    # Rank 1 frozen: rank 0 waits in a collective that never returns; SIGTERM still ends it within its grace.
    cmd, env = torchrun(args(data, tmp_path, "frozen", 100_000, "--save_interval", "100000"), pause="step 5")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        zero, one = paused_ranks(proc)
        os.kill(zero, signal.SIGCONT)  # on into step 6, whose sums wait for rank 1
        sent = time.monotonic()
        os.kill(zero, signal.SIGTERM)
        wait_until(lambda: proc_state(zero) in (None, "Z"), "rank 0 ended", seconds=60)
        assert time.monotonic() - sent < 30, "rank 0 did not end within its grace"
    finally:
        os.kill(one, signal.SIGKILL)
        proc.kill()
        out, _ = proc.communicate(timeout=60)
    assert "rank 0 stopped by SIGTERM" in out and "blocked" in out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_torchrun_signalled_during_the_end_of_run_score_says_training_finished(data, tmp_path):
    _, err = preempted(args(data, tmp_path, "run", 6), "score", stderr=subprocess.PIPE)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert f"training finished at step 6 ({latest} holds it); SIGTERM interrupted the end-of-run score: for the " \
           f"score, python evaluate.py --checkpoint {latest}" in err, err[-3000:]
    assert "blocked in a collective" not in err


def test_a_run_moved_with_its_data_resumes_and_one_moved_without_says_which_flag(data, tmp_path, capsys):
    import shutil as sh

    place = tmp_path / "old"
    (place / "data").mkdir(parents=True)
    # the search looks up to / for <data set>/<split>: a name no other folder there has (a /tmp/sm3/train did)
    name = f"sm3-{tmp_path.parent.name}-{os.getpid()}"
    split = [str(sh.copytree(d, place / "data" / name / os.path.basename(d))) for d in data]
    train.main(args(split, place / "runs", "run", 3))
    moved = tmp_path / "new"
    sh.move(str(place), str(moved))  # the run and its data, copied elsewhere: the recorded folders are gone
    again = ["--root_log_dir", str(moved / "runs"), "--log_dir", "run", "--gradient_steps", "6", "--resume"]
    train.main(again)
    ckpt = weights(moved / "runs" / "run")
    assert ckpt["step"] == 6 and ckpt["config"]["train_data_dir"] == str(moved / "data" / name / "train")
    sh.rmtree(moved / "data")
    main_error(train.main, again[:-2] + ["9", "--resume"], capsys, "--train_data_dir: the run's data folder",
               "pass --train_data_dir")
