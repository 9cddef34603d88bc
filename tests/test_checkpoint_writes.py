"""A checkpoint write that cannot complete leaves the run whole: the previous latest.pt still loads, no partial
file is left behind, and the one error line names the path and the cause. The write fails part way for real: the
resumed run is started under a file size limit (RLIMIT_FSIZE) smaller than a checkpoint, so write() stops with
EFBIG in the middle of the file (CPython ignores SIGXFSZ)."""
import os
import resource
import subprocess
import sys

import torch

from conftest import ROOT, args, weights


def test_a_checkpoint_write_that_fails_part_way_keeps_the_last_one(data, tmp_path):
    train = [sys.executable, os.path.join(ROOT, "train.py")]
    subprocess.run(train + args(data, tmp_path, "run", 3), check=True, capture_output=True, timeout=300)
    folder = tmp_path / "run" / "checkpoints"
    latest = folder / "latest.pt"
    size = latest.stat().st_size

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = subprocess.run(train + args(data, tmp_path, "run", 6, "--resume"), preexec_fn=small_files,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == (f"error: {latest}: cannot write the checkpoint (File too large); the run stops here, and the "
                        f"checkpoint before it is as it was")
    assert weights(tmp_path / "run")["step"] == 3  # still loads, at the step it held
    assert sorted(os.listdir(folder)) == ["latest.pt", "step_00000003.pt"]  # no half-written temp file
    assert torch.load(folder / "step_00000003.pt", weights_only=True)["step"] == 3
