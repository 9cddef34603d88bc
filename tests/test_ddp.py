"""train.py under torchrun: a dead rank ends the job (that 2 ranks compute what 1 process computes:
test_reproducibility.py)."""
import os
import signal
import subprocess

import pytest

from conftest import args, rank_pid, torchrun, wait_until, weights


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_killed_rank_ends_the_job(data, tmp_path):
    cmd, env = torchrun(args(data, tmp_path, "run", 100_000))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def rank1_training():  # its third step's checkpoint written: training under way
            return proc.poll() is not None or ((tmp_path / "run" / "checkpoints" / "step_00000003.pt").exists()
                                               and rank_pid(proc, 1) is not None)
        wait_until(rank1_training, "rank 1 under way")
        rank1 = rank_pid(proc, 1)
        assert rank1, "rank 1 not found"
        os.kill(rank1, signal.SIGKILL)
        out, _ = proc.communicate(timeout=90)  # ends, does not hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    # Ours: rank 0 either sees the broken connection first or is stopped by torchrun's SIGTERM.
    assert "rank 0: lost contact with the other processes" in out or "rank 0 stopped by SIGTERM" in out
    assert "rank      : 1" in out and "SIGKILL" in out  # torchrun's summary names the dead rank
    assert weights(tmp_path / "run")["step"] >= 3  # the checkpoint stays loadable
