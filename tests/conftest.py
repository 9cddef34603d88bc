"""Shared test helpers: the repo root on sys.path, ../shared/fixtures, tiny data sets and checkpoints, train.py's
flags for a tiny GQN, and torchrun launched from a test."""
import io
import math
import os
import socket
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")

import config  # noqa: E402
from gqn_dataset import write_shard  # noqa: E402
from model import GQN  # noqa: E402


@pytest.fixture
def fixtures_dir():
    if not os.path.isdir(FIXTURES):
        pytest.skip(f"{FIXTURES} not found (CI places ../shared beside the clone)")
    return FIXTURES


@pytest.fixture
def one_thread():
    """Tiny convolutions on one thread: on a busy 2-core machine a second OpenMP thread makes them 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ train.py runs

# train.py's flags for a tiny GQN on 16x16 images (the 64x64 data resized): a step takes milliseconds.
TINY = ["--layers", "2", "--r_dim", "8", "--h_dim", "8", "--u_dim", "8", "--z_dim", "2", "--image_size", "16",
        "--batch_size", "4", "--workers", "0", "--seed", "3"]


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """12 training and 4 test scenes of the built-in renderer (3 cubes), in the converted format."""
    sys.path.insert(0, os.path.join(ROOT, "dataset"))
    from shepard_metzler import render_dataset

    out = tmp_path_factory.mktemp("data") / "shepard_metzler_3_parts"
    train_dir, test_dir = render_dataset(str(out), 12, 4, parts=3, seed=0, progress=False)
    return train_dir, test_dir


def args(data, root, name, steps, *extra):
    return ["--train_data_dir", data[0], "--test_data_dir", data[1], "--root_log_dir", str(root), "--log_dir", name,
            "--gradient_steps", str(steps), "--log_interval", "3", "--save_interval", "3", *TINY, *extra]


def weights(run):
    return torch.load(os.path.join(run, "checkpoints", "latest.pt"), weights_only=True)


def tiny_default_job(monkeypatch, folder):
    """`python train.py` in `folder` with the built-in data and the cpu preset cut to a few scenes and a tiny GQN."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(config, "BUILTIN_DATA", dict(parts=3, train_scenes=6, test_scenes=2, seed=0, workers=1))
    monkeypatch.setitem(config.PRESETS, "cpu", {**config.CPU_PRESET, "layers": 2, "r_dim": 8, "h_dim": 8, "u_dim": 8,
                                               "z_dim": 2, "image_size": 16, "batch_size": 2, "gradient_steps": 2,
                                               "log_interval": 1, "save_interval": 2, "workers": 0})


# ------------------------------------------------------------------------------------------------ torchrun

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv, rdzv=False, pause=None):
    """`torchrun --nproc_per_node 2 train.py ...`, or with rdzv the README's several-node form on one node; `pause`:
    every rank stops itself at that moment (paused_env)."""
    port = str(free_port())
    launch = (["--nnodes", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"] if rdzv
              else ["--master_port", port])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *launch,
           os.path.join(ROOT, "train.py"), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return cmd, paused_env(pause, env) if pause else env


# ------------------------------------------------------------------------------------------------ a job's moments
# A test that signals, kills or damages a running job picks the moment by the job's progress, never by sleeping:
# with GQN_TEST_PAUSE the job stops itself (SIGSTOP) at a step or before its end-of-run score
# (distributed.pause_for_test), the test acts, then continues it with SIGCONT.

def paused_env(moment, env=None):
    """The environment of a job that stops itself at `moment` ("step N" or "score")."""
    return {**(os.environ if env is None else env), "GQN_TEST_PAUSE": moment, "PYTHONUNBUFFERED": "1"}


def proc_state(pid):
    """The state letter of /proc/<pid>/stat (R, S, T stopped, Z ...), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def wait_until(condition, what, seconds=600):
    """Poll condition() until it holds; fail naming `what` after `seconds` (a bound for a hung job, not a timing)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.02)


def wait_paused(pid, proc=None):
    """Until process `pid` has stopped itself (GQN_TEST_PAUSE); `proc`: the job, which must not have ended first."""
    def check():
        assert proc is None or proc.poll() is None, f"the job ended before pausing: {proc.returncode}"
        return proc_state(pid) == "T"
    wait_until(check, f"process {pid} paused")


def signal_pending(pid, sig):
    """Whether `sig` waits to be delivered to the stopped process `pid` (/proc/<pid>/status: SigPnd, ShdPnd)."""
    with open(f"/proc/{pid}/status") as f:
        masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m >> (sig - 1) & 1 for m in masks)


def rank_pid(proc, r):
    """torchrun's worker of rank r (a child of the agent `proc`, found by its RANK), or None."""
    return next((c for c in children(proc.pid) if env_of(c).get(b"RANK") == str(r).encode()), None)


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


# ------------------------------------------------------------------------------------------------ toy data, checkpoints

SIZE = 16  # tiny images keep a CPU test in seconds
TINY_MODEL = dict(representation="pool", L=2, r_dim=16, h_dim=8, z_dim=2, u_dim=8)  # GQN kwargs


def make_data(folder, scenes=5, views=6, size=SIZE, seed=0, dataset="shepard_metzler_5_parts"):
    """A converted split of toy scenes: a coloured square that moves with the camera's yaw."""
    rng = np.random.default_rng(seed)
    frames, cameras = [], np.zeros((scenes, views, 7), np.float32)
    for i in range(scenes):
        colour = rng.integers(0, 256, 3)
        scene = []
        for j in range(views):
            yaw, pitch = rng.uniform(-math.pi, math.pi), rng.uniform(-0.5, 0.5)
            d = np.array([math.cos(pitch) * math.cos(yaw), -math.cos(pitch) * math.sin(yaw), math.sin(pitch)])
            cameras[i, j] = [*(-3 * d), math.sin(yaw), math.cos(yaw), math.sin(pitch), math.cos(pitch)]
            img = np.full((size, size, 3), 40, np.uint8)
            x0 = int((yaw + math.pi) / (2 * math.pi) * (size - size // 4))
            img[size // 4:size // 2, x0:x0 + size // 4] = colour
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            scene.append(buf.getvalue())
        frames.append(scene)
    write_shard(str(folder / "001-of-001.pt"), frames, cameras, dataset, size)
    return folder


def make_checkpoint(path, image_size=SIZE, data_size=None, seed=0, **overrides):
    """A checkpoint in train.py's format around a freshly initialised tiny GQN."""
    torch.manual_seed(seed)
    model = GQN(image_size=image_size, **{**TINY_MODEL, **overrides})
    torch.save({"model": model.state_dict(), "model_config": model.config, "optimizer": {}, "step": 7,
                "config": {}, "data": {"dataset": "shepard_metzler_5_parts",
                                       "image_size": data_size or image_size, "max_context": 5},
                "rng": {}}, path)
    return path


# ------------------------------------------------------------------------------------------------ fuzzing profiles

# tests/test_fuzz_*.py (helpers in tests/fuzzing.py). "quick", the default, tries a fixed set of inputs
# (derandomized: every run and CI see the same ones), 300 a reader, in under a minute on one core; "long"
# (`python -m pytest tests/test_fuzz_*.py --hypothesis-profile long`) 10,000 new ones a reader (its properties share
# them: fuzzing.share). Neither keeps an example database, so nothing is written into the repository (hypothesis
# caches Unicode tables under .hypothesis/, which .gitignore leaves out).
from hypothesis import HealthCheck, settings  # noqa: E402

_FUZZING = dict(database=None, deadline=10_000, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("quick", max_examples=300, derandomize=True, **_FUZZING)
settings.register_profile("long", max_examples=10_000, **_FUZZING)
settings.load_profile("quick")
