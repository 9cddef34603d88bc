"""A scene that goes bad during training costs nothing: a corrupted JPEG and a truncated shard, met by one process and
by two torchrun ranks (with a DataLoader worker), are skipped and named; a run stopped and resumed over the damaged
data ends with the weights of one that ran through it; --max_bad_scenes 0 stops with latest.pt at the step reached;
evaluate.py leaves unreadable test scenes out and names them."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import gqn_dataset
import resolve
import train
from bad_scenes import BadScenes
from cli import UserError
from conftest import ROOT, args, children, paused_env, rank_pid, torchrun, wait_paused, wait_until, weights
from gqn_dataset import REFILLS, DatasetError, GQNDataset, TrainBatches

BAD_JPEG_SCENE = 2  # of the first training shard
TRUNCATED = "003-of-003.pt"  # the last training shard: scenes 16..23


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """24 training scenes in 3 shards of 8, 4 test scenes; tests damage copies of it (`damaged`)."""
    sys.path.insert(0, os.path.join(ROOT, "dataset"))
    from shepard_metzler import render_dataset

    out = tmp_path_factory.mktemp("clean") / "shepard_metzler_3_parts"
    render_dataset(str(out), 24, 4, parts=3, seed=0, scenes_per_shard=8, progress=False)
    return out


@pytest.fixture
def data(clean, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(clean, out)
    return str(out / "train"), str(out / "test")


def corrupt_scene(shard, scene):
    """Overwrite the start (the JPEG SOI marker) of every frame of `scene`, in place, as a bad disk block would."""
    obj = torch.load(shard, weights_only=True)
    jpeg, offsets, views = obj["jpeg"].numpy().tobytes(), obj["offsets"].tolist(), obj["views"]
    with open(shard, "rb") as f:
        raw = f.read()
    start = raw.find(jpeg[:4096])  # where the JPEG bytes lie in the zip
    assert start >= 0 and raw.find(jpeg[:4096], start + 1) < 0
    with open(shard, "r+b") as f:
        for j in range(scene * views, (scene + 1) * views):
            f.seek(start + offsets[j])
            f.write(b"\0\0\0\0")


def damage(data):
    """A bad JPEG in one training scene, the last training shard cut in half, a bad JPEG in test scene 1."""
    corrupt_scene(os.path.join(data[0], "001-of-003.pt"), BAD_JPEG_SCENE)
    shard = os.path.join(data[0], TRUNCATED)
    os.truncate(shard, os.path.getsize(shard) // 2)
    corrupt_scene(os.path.join(data[1], "001-of-001.pt"), 1)


LENIENT = ("--max_bad_scenes", "1000")  # a run that skips the damaged scenes and carries on


def skipped_named(stderr):
    """The training scenes the warnings named -> set of ids."""
    out = set()
    for line in stderr.splitlines():
        if "skipped training scene" in line:
            ids = line.split("skipped training scene")[1].lstrip("s ").split(", which")[0]
            out |= {int(i) for i in ids.split(", ")}
    return out


# ------------------------------------------------------------------------------------------------ the reader

def test_a_batch_refills_deterministically_and_says_what_it_skipped(data):
    ds = GQNDataset(data[0])
    damage(data)  # after the folder was opened, as during a run
    batches = TrainBatches(ds, 8, 3, seed=5, noise={"eps": ("normal", (2,))})
    again = TrainBatches(GQNDataset(data[0], layout=ds.layout), 8, 3, seed=5, noise={"eps": ("normal", (2,))})
    met = set()
    for step in range(6):
        b, b2 = batches[step], again[step]  # the damaged folder, as this run and as a resumed one opens it
        assert b["unserved"] is None and [s for s, _ in b["bad"]] == [s for s, _ in b2["bad"]]
        for k in ("x", "v", "x_q", "v_q", "mask", "scene", "eps"):
            assert torch.equal(b[k], b2[k]), k
        served = set(b["scene"].tolist())
        assert not served & ({BAD_JPEG_SCENE} | set(range(16, 24)))  # only readable scenes are trained on
        assert b["mask"].any(1).all()  # every place filled
        for scene, why in b["bad"]:
            met.add(scene)
            assert why.startswith(data[0])
            assert ("bad JPEG" in why) == (scene == BAD_JPEG_SCENE)
    assert met  # 6 steps of 8 of 24 scenes: two epochs, every bad scene was met
    assert met == {BAD_JPEG_SCENE} | set(range(16, 24))


def test_a_truncated_shard_is_seen_before_it_is_read(data):
    """A shard cut short since it was last read: the reader sees the change before it reads, and names it."""
    ds = GQNDataset(data[0])
    ds.load(20, [0])
    shard = os.path.join(data[0], TRUNCATED)
    os.truncate(shard, 4096)
    with pytest.raises(DatasetError, match=TRUNCATED):
        ds.load(20, [0])
    assert ds.load(0, [0])[0].shape == (1, 3, 64, 64)  # the other shards still serve


# Reads shard 3's scenes (16..23) until told to stop, each with the stat before it passed as unchanged (the moment
# between that stat and the read, where a truncation used to end the process with SIGBUS); counts what it skipped.
RACING_READER = """
import os, sys
import gqn_dataset
from gqn_dataset import DatasetError, GQNDataset
folder, stop = sys.argv[1:]
ds = GQNDataset(folder)
ds.load(16, [0])
stale = dict(ds._mapped)
gqn_dataset._identity = lambda path: stale[ds._paths.index(path)]
read = skipped = 0
print("reading", flush=True)
while not os.path.exists(stop):
    for scene in range(16, 24):
        try:
            ds.load(scene, range(ds.views))
            read += 1
        except DatasetError as e:
            assert str(e).startswith(ds._paths[2]), e
            skipped += 1
print(read, skipped)
"""


def test_a_shard_truncated_while_it_is_read_costs_its_scenes_not_the_run(data, tmp_path):
    """50 truncations at random moments (to random lengths, the bytes written back after a few ms) while a reader
    reads the shard with no stat to warn it: each read either serves the scene or skips it, naming the shard."""
    shard, stop = os.path.join(data[0], TRUNCATED), str(tmp_path / "stop")
    with open(shard, "rb") as f:
        whole = f.read()
    reader = subprocess.Popen([sys.executable, "-c", RACING_READER, data[0], stop], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rng = random.Random(0)
    try:
        assert reader.stdout.readline() == "reading\n"
        for _ in range(50):
            time.sleep(rng.uniform(0, 0.01))
            os.truncate(shard, rng.randrange(len(whole)))
            time.sleep(rng.uniform(0, 0.01))
            with open(shard, "r+b") as f:
                f.write(whole)
    finally:
        open(stop, "w").close()
        out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err  # -7 was SIGBUS
    read, skipped = map(int, out.split())
    assert read > 0 and read + skipped >= 8


def test_a_replaced_shard_is_read_again(data, clean):
    ds = GQNDataset(data[0])
    before = ds.load(10, [1])[0]
    shard = os.path.join(data[0], "002-of-003.pt")
    os.remove(shard)
    with pytest.raises(DatasetError, match="002-of-003.pt: cannot read"):
        ds.load(10, [1])
    shutil.copy(os.path.join(clean, "train", "002-of-003.pt"), shard)  # back, as a new file
    assert torch.equal(ds.load(10, [1])[0], before)


def test_a_place_no_scene_can_fill_stops_the_step(data):
    ds = GQNDataset(data[0])
    for name in os.listdir(data[0]):
        os.truncate(os.path.join(data[0], name), 100)
    b = TrainBatches(ds, 4, 3, seed=0)[0]
    assert b["unserved"] and f"nor any of the {REFILLS} scenes drawn to replace it" in b["unserved"]


def test_max_bad_scenes_counts_reads(data):
    class One:
        started, rank = False, 0

        def all_reduce(self, t):
            return t

    batch = {"bad": [(3, "x: bad JPEG")], "unserved": None}
    assert BadScenes(0.01, 24, 4, One()).limit(0) == pytest.approx(0.24)  # 1% of an epoch at first
    assert BadScenes(0.01, 24, 4, One()).limit(99) == pytest.approx(4.0)  # then 1% of the reads
    bad = BadScenes(2, 24, 4, One())
    bad.check(0, batch)
    bad.check(1, batch)
    with pytest.raises(UserError, match="3 scene reads failed, more than --max_bad_scenes 2"):
        bad.check(2, batch)
    assert bad.count == 2  # the step that stopped did not run: a resumed run reads its batch again


# ------------------------------------------------------------------------------------------------ train.py

def damaged_once_open(monkeypatch, data, harm=damage):
    """train.py's run does harm(data) once it has opened both splits, before its first step."""
    opened = []

    def open_then_damage(*a, **k):
        ds = gqn_dataset.open_split(*a, **k)
        opened.append(ds)
        if len(opened) == 2:
            harm(data)
        return ds

    monkeypatch.setattr(resolve, "open_split", open_then_damage)


def test_one_process_stopped_and_resumed_over_damaged_data_equals_an_uninterrupted_run(clean, tmp_path, monkeypatch,
                                                                                     capsys):
    runs = {}
    for name in ("uninterrupted", "resumed"):  # each on its own copy of the data, damaged after the run began
        shutil.copytree(clean, tmp_path / name / "data")
        runs[name] = (str(tmp_path / name / "data" / "train"), str(tmp_path / name / "data" / "test"))
    with monkeypatch.context() as m:
        damaged_once_open(m, runs["uninterrupted"])
        train.main(args(runs["uninterrupted"], tmp_path, "uninterrupted-run", 12, *LENIENT))
    out = capsys.readouterr()
    assert "Skipped" in out.out and BAD_JPEG_SCENE in skipped_named(out.err)
    with monkeypatch.context() as m:
        damaged_once_open(m, runs["resumed"])
        train.main(args(runs["resumed"], tmp_path, "resumed-run", 7, *LENIENT))
    train.main(args(runs["resumed"], tmp_path, "resumed-run", 12, *LENIENT, "--resume"))  # reads the damaged folder
    whole, resumed = weights(tmp_path / "uninterrupted-run"), weights(tmp_path / "resumed-run")
    assert whole["step"] == resumed["step"] == 12
    assert whole["bad_scenes"] == resumed["bad_scenes"] > 0
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], resumed["model"][k]), k
    with pytest.raises(SystemExit) as e:  # a fresh run on a damaged folder: one line naming the file
        train.main(args(runs["resumed"], tmp_path, "fresh", 3, *LENIENT))
    assert e.value.code == 1 and TRUNCATED in capsys.readouterr().err


def test_a_training_folder_gone_during_the_run_stops_it_with_latest(data, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m, pytest.raises(SystemExit) as e:
        damaged_once_open(m, data, lambda d: shutil.rmtree(d[0]))
        train.main(args(data, tmp_path, "r", 12, *LENIENT))
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert e.value.code == 1 and "Traceback" not in err and len(errors) == 1
    assert f"nor any of the {REFILLS} scenes drawn to replace it can be read" in errors[0]
    assert "the training data cannot serve" in errors[0]
    assert "latest.pt holds step 0" in errors[0] and weights(tmp_path / "r")["step"] == 0


def test_max_bad_scenes_0_stops_with_latest_at_the_step_reached(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "r", 3, *LENIENT))
    damage(data)
    with pytest.raises(SystemExit) as e:
        train.main(args(data, tmp_path, "r", 30, *LENIENT, "--resume", "--max_bad_scenes", "0"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "more than --max_bad_scenes 0" in line[0] and "latest.pt holds step" in line[0]
    step = int(line[0].split("error: step ")[1].split(":")[0])
    assert f"holds step {step}:" in line[0]
    ckpt = weights(tmp_path / "r")
    assert ckpt["step"] == step and ckpt["bad_scenes"] == 0  # the step met the first bad scene and did not run
    train.main(args(data, tmp_path, "r", 12, *LENIENT, "--resume"))  # a higher limit continues it
    assert weights(tmp_path / "r")["step"] == 12


def run_damaged_while_running(data, root, argv, procs):
    """Start train.py, damage the data while it runs (every training process paused after step 1, their DataLoader
    workers stopped), let it finish -> stdout, stderr."""
    if procs == 1:
        cmd, env = [sys.executable, os.path.join(ROOT, "train.py"), *argv], paused_env("step 1")
    else:
        cmd, env = torchrun(argv, pause="step 1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if procs == 1:
        trainers = [p.pid]
    else:
        wait_until(lambda: p.poll() is not None or all(rank_pid(p, r) for r in range(procs)), "torchrun's ranks")
        trainers = [rank_pid(p, r) for r in range(procs)]
    for pid in trainers:
        wait_paused(pid, p)
    workers = [c for t in trainers for c in children(t)]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    damage(data)
    for pid in workers + trainers:
        os.kill(pid, signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return out, err


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_damaged_while_training_the_run_finishes_and_names_them(data, tmp_path, procs):
    extra = ["--log_interval", "1", "--workers", "1"] if procs == 2 else ["--log_interval", "1"]
    out, err = run_damaged_while_running(data, tmp_path, args(data, tmp_path, "r", 60, *LENIENT, *extra), procs)
    named = skipped_named(err)
    assert BAD_JPEG_SCENE in named and set(range(16, 24)) <= named  # 60 steps of 4 are 10 epochs
    ckpt = weights(tmp_path / "r")
    assert ckpt["step"] == 60 and ckpt["bad_scenes"] >= 9
    assert f"Skipped {ckpt['bad_scenes']} reads of unreadable training scenes" in out
    assert "1 left out: they cannot be read" in out  # the test scene, at the end-of-run score
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "r"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("data/skipped_scenes")[-1].value == ckpt["bad_scenes"]


@pytest.mark.slow
def test_two_ranks_skip_as_one_process_does(data, tmp_path):
    """Resumed over the damaged data: 2 ranks (a worker each) and one process skip the same reads, and a 2-rank run
    stopped and resumed equals one that ran through; --max_bad_scenes 0 stops every rank with latest.pt."""
    def launch(name, steps, *extra):
        cmd, env = torchrun(args(data, tmp_path, name, steps, *LENIENT, "--workers", "1", *extra))
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    assert launch("through", 3).returncode == 0
    for name in ("resumed", "stops"):  # the same 3 steps, deterministic: a copied run folder (a launch fewer each)
        shutil.copytree(tmp_path / "through", tmp_path / name)
    train.main(args(data, tmp_path, "one", 3, *LENIENT))
    damage(data)
    assert launch("through", 9, "--resume").returncode == 0
    assert launch("resumed", 6, "--resume").returncode == 0
    assert launch("resumed", 9, "--resume").returncode == 0
    train.main(args(data, tmp_path, "one", 9, *LENIENT, "--resume"))
    through, resumed, one = (weights(tmp_path / n) for n in ("through", "resumed", "one"))
    assert through["bad_scenes"] == resumed["bad_scenes"] == one["bad_scenes"] > 0
    for k in through["model"]:
        assert torch.equal(through["model"][k], resumed["model"][k]), k
        torch.testing.assert_close(through["model"][k], one["model"][k], rtol=1e-5, atol=1e-6)
    r = launch("stops", 30, "--resume", "--max_bad_scenes", "0")
    # the ranks' last word is one line; torchrun's agent then reports the failed ranks with a traceback of its own
    assert r.returncode == 1 and not re.search(rf'File "{re.escape(ROOT)}/\w+\.py"', r.stderr)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "more than --max_bad_scenes 0" in errors[0]
    assert weights(tmp_path / "stops")["step"] == int(errors[0].split("error: step ")[1].split(":")[0])


# ------------------------------------------------------------------------------------------------ evaluate.py

def test_evaluate_leaves_out_and_names_unreadable_test_scenes(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "r", 3, *LENIENT))
    damage(data)
    path = tmp_path / "e.json"
    argv = ["--checkpoint", str(tmp_path / "r" / "checkpoints" / "latest.pt"), "--test_data_dir", data[1],
            "--train_data_dir", data[0], "--json", str(path)]
    evaluate.main(argv)
    err = capsys.readouterr().err
    assert "left out test scene 1, which cannot be read" in err and "bad JPEG" in err
    assert TRUNCATED in err  # the mean image went without the truncated training shard
    r = json.loads(path.read_text())
    assert r["scenes"] == 3 and [u[0] for u in r["unreadable"]] == [1]
    os.truncate(os.path.join(data[1], "001-of-001.pt"), 100)  # the whole split: nothing to score, one line
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert e.value.code == 1 and "--test_data_dir" in capsys.readouterr().err
