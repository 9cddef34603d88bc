"""Shared test helpers, the one home of each: the repo root on sys.path, ../shared/fixtures, a tiny GQN (its sizes,
train.py's flags for it, a random batch), tiny data sets and checkpoints, train.py's argv, a command run as a user
types it, the one-error-line contract, torchrun launched from a test, and a running job paused at a chosen step."""
import io
import math
import os
import pickle
import signal
import socket
import subprocess
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


@pytest.fixture(autouse=True)
def process_state_kept():
    """What train.py sets for its whole process, put back after a test that ran it in-process: subnormal floats
    flushed to zero (hypothesis refuses to draw floats in that state), and the SIGINT/SIGTERM handlers a run stopped
    by a signal leaves (a second signal exits at once)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    torch.set_flush_denormal(False)
    for s, handler in handlers.items():
        signal.signal(s, handler)


@pytest.fixture
def one_thread():
    """Tiny convolutions on one thread: on a busy 2-core machine a second OpenMP thread makes them 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ a tiny GQN

SIZE = 16  # tiny images keep a CPU test in seconds
# A tiny GQN's sizes (GQN's keywords; representation and L are each test's): a step takes milliseconds. u_dim differs
# from h_dim so that a canvas and a state confused with each other cannot go unnoticed.
TINY_GQN = dict(r_dim=16, h_dim=8, z_dim=2, u_dim=6, image_size=SIZE)
TINY_MODEL = dict(representation="pool", L=2, **TINY_GQN)  # the GQN of the tests' checkpoints
# train.py's flags for a tiny GQN on 16x16 images (the 64x64 data resized).
TINY = ["--layers", "2", "--r_dim", "8", "--h_dim", "8", "--u_dim", "8", "--z_dim", "2", "--image_size", str(SIZE),
        "--batch_size", "4", "--workers", "0", "--seed", "3"]


def random_batch(B=2, M=3, size=SIZE, seed=0, dtype=torch.float32):
    """A batch of random scenes as the model takes them: x (B, M, 3, size, size), v (B, M, 7), v_q (B, 7), x_q."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, M, 3, size, size, generator=g, dtype=dtype)
    v, v_q = torch.randn(B, M, 7, generator=g, dtype=dtype), torch.randn(B, 7, generator=g, dtype=dtype)
    return x, v, v_q, torch.rand(B, 3, size, size, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------------------------ commands

def run_script(script, *argv, cwd=None, env=None, timeout=300):
    """`python <script> argv...` as a user types it (script relative to the repository) -> CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error(code, err, *words, out=""):
    """The one error contract: exit status 1, one line on stderr that starts `error: ` and names `words`, no
    traceback, no usage block -> the line."""
    lines = err.strip().splitlines()
    assert code == 1, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert "Traceback" not in err + out and "usage:" not in err
    return lines[0]


def script_error(r, *words):
    """run_script's result held to the one error contract -> the line."""
    return one_error(r.returncode, r.stderr, *words, out=r.stdout)


def main_error(main, argv, capsys, *words):
    """A command's main(argv), in this process, held to the one error contract -> the line."""
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return one_error(e.value.code, captured.err, *words, out=captured.out)


# ------------------------------------------------------------------------------------------------ train.py runs


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """12 training and 4 test scenes of the built-in renderer (3 cubes), in the converted format."""
    sys.path.insert(0, os.path.join(ROOT, "dataset"))
    from shepard_metzler import render_dataset

    out = tmp_path_factory.mktemp("data") / "shepard_metzler_3_parts"
    train_dir, test_dir = render_dataset(str(out), 12, 4, parts=3, seed=0, progress=False)
    return train_dir, test_dir


@pytest.fixture(scope="session")
def room_data(tmp_path_factory):
    """8 training and 6 test scenes of the built-in rooms (the test split records what the objects change)."""
    from dataset import builtin, rooms

    out = tmp_path_factory.mktemp("rooms")
    return builtin.render_dataset(str(out), rooms.Rooms(), 8, 6, seed=1, scenes_per_shard=4, progress=False)


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


def wait_until(condition, what, seconds=int(os.environ.get("GQN_WAIT", 600))):
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
    model = GQN(**{**TINY_MODEL, "image_size": image_size, **overrides})
    torch.save({"model": model.state_dict(), "model_config": model.config, "optimizer": {}, "step": 7,
                "config": {}, "data": {"dataset": "shepard_metzler_5_parts",
                                       "image_size": data_size or image_size, "max_context": 5},
                "rng": {}}, path)
    return path


def legacy_stream(payload):
    """torch's legacy (non-zip) torch.save stream around a pickled payload, as torch-gqn's converter wrote its scene
    files: magic number, protocol, sys_info, the payload, the storage keys (each a protocol-2 pickle)."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    return head + payload + pickle.dumps([], protocol=2)


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
