"""train.py under torchrun: 2 CPU processes (gloo) compute what 1 process computes; a dead rank ends the job."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT
from test_train import TINY, data, weights  # noqa: F401  (data: the session's tiny rendered set)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv, rdzv=False):
    """`torchrun --nproc_per_node 2 train.py ...`, or with rdzv the README's several-node form on one node."""
    port = str(free_port())
    launch = (["--nnodes", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"] if rdzv
              else ["--master_port", port])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *launch,
           os.path.join(ROOT, "train.py"), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return cmd, env


def run_args(data, root, name, steps):
    return ["--train_data_dir", data[0], "--test_data_dir", data[1], "--root_log_dir", str(root), "--log_dir", name,
            "--gradient_steps", str(steps), "--log_interval", "3", "--save_interval", "3", *TINY]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume(data, tmp_path):
    # The reference: one process, global batch 4.
    train.main(run_args(data, tmp_path / "one", "run", 6))
    # Two processes, 2 scenes each of the same global batch; stopped after 3 steps and resumed under torchrun.
    root = tmp_path / "two"
    # The resumed half goes through c10d rendezvous, the launch line the README gives for several nodes.
    for steps, extra in ((3, []), (6, ["--resume"])):
        cmd, env = torchrun(run_args(data, root, "run", steps) + extra, rdzv=bool(extra))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("Done:") == 1  # rank 0 alone reports
    one, two = weights(tmp_path / "one" / "run"), weights(root / "run")
    assert two["step"] == 6
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], atol=1e-4, rtol=0)
    assert not any(k.startswith("module.") for k in two["model"])
    # Rank 0 alone writes: one run folder, one checkpoints folder, TensorBoard events only there.
    assert os.listdir(root) == ["run"]
    assert sorted(os.listdir(root / "run" / "checkpoints")) == ["latest.pt", "step_00000003.pt", "step_00000006.pt"]
    events = [p for p in root.rglob("events.out.tfevents.*")]
    assert len(events) == 2 and all(p.parent == root / "run" for p in events)  # one writer per launch, same run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/elbo")] == [3, 6]
    ref = EventAccumulator(str(tmp_path / "one" / "run"))
    ref.Reload()
    for tag in ("train/elbo", "test/elbo"):  # metrics reduced over both ranks: the whole batch's means
        for a, b in zip(acc.Scalars(tag), ref.Scalars(tag)):
            assert a.value == pytest.approx(b.value, rel=1e-5)


def children(pid):
    """Child process ids, from /proc (every process's parent id: works without CONFIG_PROC_CHILDREN)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the "(comm)" field
                out.append(int(name))
    return out


def env_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return {}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_killed_rank_ends_the_job(data, tmp_path):
    cmd, env = torchrun(run_args(data, tmp_path, "run", 100_000))
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
