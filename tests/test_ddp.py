"""train.py under torchrun: a dead rank ends the job (that 2 ranks compute what 1 process computes:
test_reproducibility.py)."""
import os
import signal
import subprocess
import time

import pytest

from conftest import args, children, env_of, torchrun, weights


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_killed_rank_ends_the_job(data, tmp_path):
    cmd, env = torchrun(args(data, tmp_path, "run", 100_000))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        rank1 = None
        while time.time() < deadline and proc.poll() is None:
            if (tmp_path / "run" / "checkpoints" / "step_00000003.pt").exists():  # training under way
                rank1 = next((c for c in children(proc.pid) if env_of(c).get(b"RANK") == b"1"), None)
                if rank1:
                    break
            time.sleep(0.1)
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
