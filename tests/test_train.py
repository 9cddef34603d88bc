"""train.py: flags, resume equality, checkpoints, TensorBoard, the default job's data, non-finite loss, bad input."""
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import (ROOT, TINY, args, main_error, paused_env, run_script, script_error, tiny_default_job,
                      wait_paused, weights)
from cli import UserError
from config import RunState, parse_args
from dataset_names import resolve_dataset
import distributed
from distributed import cpu_has_bf16

# ------------------------------------------------------------------------------------------------ flags

def test_bool_flags_parse_true_false_1_0():
    for text, value in [("True", True), ("False", False), ("1", True), ("0", False), ("false", False)]:
        cfg, _ = parse_args(["--shared_core", text, "--compile", text])
        assert cfg.shared_core is value and cfg.compile is value
    assert parse_args(["--checkpoint_activations"])[0].checkpoint_activations is True
    with pytest.raises(UserError, match="--shared_core.*True/False/1/0"):
        parse_args(["--shared_core", "maybe"])


def test_unknown_and_abbreviated_flags_are_errors():
    with pytest.raises(UserError, match="--learning_rate"):
        parse_args(["--learning_rate", "1"])
    with pytest.raises(UserError, match="--grad"):
        parse_args(["--grad", "1"])  # no prefix matching: --grad is not --gradient_steps


def test_presets():
    paper, _ = parse_args(["--train_data_dir", "a", "--test_data_dir", "b"])
    assert (paper.preset, paper.batch_size, paper.gradient_steps, paper.layers, paper.representation) == \
        ("paper", 36, 2_000_000, 12, "pool")
    assert (paper.lr_i, paper.lr_f, paper.lr_n, paper.sigma_i, paper.sigma_f, paper.sigma_n) == \
        (5e-4, 5e-5, 1.6e6, 2.0, 0.7, 2e5)
    assert paper.adam_betas == (0.9, 0.999) and paper.adam_eps == 1e-8 and paper.shared_core is False
    cpu, _ = parse_args([])
    assert cpu.preset == "cpu" and cpu.gradient_steps < paper.gradient_steps
    assert parse_args(["--layers", "3"])[0].layers == 3  # flags override the preset


def schedules(argv):
    """The run's (config, lr_n, sigma_n) as counts of steps, as a fresh run of these flags starts."""
    cfg, _ = parse_args(argv)
    return (cfg, *RunState.start(cfg).schedules(cfg))


def test_cpu_schedules_follow_gradient_steps_and_paper_schedules_keep_the_papers_steps():
    from scheduler import learning_rate, pixel_sigma

    # the cpu preset: the learning rate annealed over the run and sigma over 0.8 of it, whatever its length
    short, lr_n, sigma_n = schedules(["--gradient_steps", "300"])
    assert (lr_n, sigma_n) == (300, 240)
    assert pixel_sigma(240, short.sigma_i, short.sigma_f, sigma_n) == pytest.approx(0.4)  # low: z is used
    assert pixel_sigma(299, short.sigma_i, short.sigma_f, sigma_n) == pytest.approx(0.4)  # the last fifth
    assert pixel_sigma(120, short.sigma_i, short.sigma_f, sigma_n) == pytest.approx(1.2)
    assert learning_rate(300, short.lr_i, short.lr_f, lr_n) == pytest.approx(2e-4)
    cpu, _ = parse_args([])  # --train_minutes: resolved once the clock fixes the length, over its bound until then
    assert cpu.sigma_n == 0.8 and RunState.start(cpu).sigma_n is None
    assert schedules(["--gradient_steps", "1000", "--lr_n", "0.25", "--sigma_n", "0"])[1:] == (250, 1000)
    assert schedules(["--train_data_dir", "a", "--test_data_dir", "b", "--gradient_steps", "300"])[1:] == (1.6e6, 2e5)
    own, lr_n, sigma_n = schedules(["--gradient_steps", "300", "--sigma_n", "100", "--lr_i", "3e-3", "--sigma_f",
                                    "0.5"])
    assert (sigma_n, lr_n, own.lr_i, own.sigma_f) == (100, 300, 3e-3, 0.5)
    with pytest.raises(UserError, match="--sigma_n must be a non-negative number"):
        parse_args(["--sigma_n", "-1"])
    with pytest.raises(UserError, match="--lr_i: expected a positive number"):
        parse_args(["--lr_i", "0"])


def test_help_shows_the_defaults_each_preset_applies(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--layers N L, the number of generation steps (paper: 12; cpu: 4)" in text
    assert "(paper: pool; cpu: volume)" in text and "(paper: 2000000; cpu: 6000)" in text
    assert ("--sigma_n X steps over which sigma anneals (0: the whole run; under 1: that share of it) "
            "(paper: 200000; cpu: 0.8 of the run)") in text


class FakeData:
    def __init__(self, dataset, image_size=64, views=15):
        self.dataset, self.image_size, self.views = dataset, image_size, views


def test_dataset_names():
    cfg, _ = parse_args(["--train_data_dir", "d/mine/train", "--test_data_dir", "d/mine/test"])
    k = lambda *a: resolve_dataset(*a)[:2]  # noqa: E731
    sm5 = FakeData("shepard_metzler_5_parts")
    assert k("", sm5, sm5, cfg) == ("shepard_metzler_5_parts", 15)  # default: what the data records
    assert k("Shepard-Metzler", sm5, sm5, cfg) == ("shepard_metzler_5_parts", 15)
    assert k("shepard_metzler_5_parts", sm5, sm5, cfg) == ("shepard_metzler_5_parts", 15)
    legacy = FakeData(None, views=10)  # a torch-gqn folder that does not say what it holds
    assert k("Room", legacy, legacy, cfg) == ("Room", 5)
    assert k("Jaco", legacy, legacy, cfg) == ("Jaco", 7)
    assert k("Labyrinth", legacy, legacy, cfg) == ("Labyrinth", 20)
    assert k("rooms_ring_camera", legacy, legacy, cfg) == ("rooms_ring_camera", 5)
    assert k("", legacy, legacy, cfg) == ("mine", 5)  # no name anywhere: the folder's, K half the views
    with pytest.raises(UserError, match="--dataset Jaco does not match"):
        k("Jaco", sm5, sm5, cfg)  # DeepMind's data under another of DeepMind's names: the wrong K
    # A data set of one's own trains under its name (or any --dataset) with K from --max_context or half its views
    mine = FakeData("my_scenes", views=8)
    assert resolve_dataset("", mine, mine, cfg) == ("my_scenes", 4, "half of its 8 views per scene (--max_context "
                                                                   "sets it)")
    assert k("Cars", mine, mine, cfg) == ("Cars", 4)
    assert k("Shepard-Metzler", mine, mine, cfg) == ("Shepard-Metzler", 15)
    given, _ = parse_args(["--train_data_dir", "a", "--test_data_dir", "b", "--max_context", "6"])
    assert resolve_dataset("", mine, mine, given) == ("my_scenes", 6, "--max_context")


# ------------------------------------------------------------------------------------------------ training runs

def test_run_writes_checkpoints_config_and_tensorboard(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.main(args(data, tmp_path, "run", 6))
    run = tmp_path / "run"
    names = sorted(os.listdir(run / "checkpoints"))
    assert names == ["latest.pt", "step_00000003.pt", "step_00000006.pt"]
    ckpt = weights(run)
    assert ckpt["step"] == 6 and {"model", "model_config", "optimizer", "config", "data", "rng"} <= set(ckpt)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["data"] == {"dataset": "shepard_metzler_3_parts", "image_size": 64, "max_context": 15,
                            "train_layout": {"format": "converted", "names": "001-of-001.pt", "scenes": [12]},
                            "test_layout": {"format": "converted", "names": "001-of-001.pt", "scenes": [4]}}
    assert ckpt["bad_scenes"] == 0
    assert ckpt["config"]["layers"] == 2 and ckpt["model_config"]["image_size"] == 16
    saved = json.loads((run / "config.json").read_text())
    assert saved["seed"] == 3 and saved["state"] == ckpt["state"] == {"steps": 6, "lr_n": 1.6e6, "sigma_n": 2e5,
                                                                      "timed_ms": 0.0}
    assert {k: v for k, v in saved.items() if k != "state"} == ckpt["config"]
    from checkpoint import build_model, load_checkpoint
    model = build_model(load_checkpoint(str(run / "checkpoints" / "step_00000003.pt")))
    assert model.config == ckpt["model_config"]
    with Image.open(run / "samples.png") as im:  # ground truth next to generated views
        assert im.size[0] > im.size[1] / 4 * 5 / 2

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for tag in ["train/elbo", "train/kl", "train/nll", "train/bits_per_dim", "train/nll_minus_sigma_floor",
                "test/elbo", "schedule/sigma", "schedule/lr", "speed/scenes_per_s", "train/grad_norm",
                "train/objective", "schedule/kl_weight", "train/kl_step_1", "train/kl_step_2"]:
        assert [e.step for e in acc.Scalars(tag)] == [3, 6], tag
    assert acc.Scalars("schedule/sigma")[0].value == pytest.approx(2.0, abs=1e-4)  # the paper schedule, step 2
    elbo, kl, nll = (acc.Scalars(f"train/{k}")[0].value for k in ("elbo", "kl", "nll"))
    assert elbo == pytest.approx(-(kl + nll), rel=1e-5)
    floor = 16 * 16 * 3 * (np.log(acc.Scalars("schedule/sigma")[0].value) + 0.5 * np.log(2 * np.pi))
    assert acc.Scalars("train/nll_minus_sigma_floor")[0].value == pytest.approx(nll - floor, rel=1e-4)
    events = acc.Images("test/views")
    assert [e.step for e in events] == [3, 6]
    with Image.open(io.BytesIO(events[-1].encoded_image_string)) as im:
        # a row for each of the 4 test scenes: 3 context views, truth, reconstruction, 4 prior samples, their spread
        # and the error of their mean; 96 px tiles (16 px x 6) with 12 px gaps, a wider one after the context, a
        # line of headings on top
        tile, gap = 96, 12
        assert im.size == (gap + 11 * (tile + gap) + 2 * gap, 16 + 6 + 4 * (tile + gap))


def test_the_run_is_resolved_once_then_frozen_and_only_its_state_changes(data, tmp_path):
    import dataclasses

    from distributed import Dist
    from resolve import resolve

    res = resolve(*parse_args(args(data, tmp_path, "r", 6)), Dist())
    assert os.path.isabs(res.cfg.train_data_dir)  # made absolute, once
    assert res.cfg.dataset == "shepard_metzler_3_parts"  # what the data records
    for field, value in (("gradient_steps", 7), ("seed", 1), ("train_data_dir", "elsewhere")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(res.cfg, field, value)
    res.state.fix(res.cfg, 5, 12.5)  # what the budget does to a run
    assert (res.state.steps, res.state.timed_ms) == (5, 12.5)


def test_a_checkpoint_of_an_earlier_version_gives_the_state_its_config_held():
    from checkpoint import saved_state

    def old(**config):  # the run's length and schedules were config fields, resolved when the budget fixed them
        return {"config": {"gradient_steps": 6000, "lr_n": 0, "sigma_n": 0.8, "train_minutes": 8.5, **config}}

    assert saved_state(old()) == RunState(6000, None, None, 0.0)  # timed, not fixed yet: over its bound until then
    assert saved_state(old(gradient_steps=4979, lr_n=4979, sigma_n=3983, timed_ms=90.1)) == \
        RunState(4979, 4979, 3983, 90.1)
    assert saved_state(old(gradient_steps=300, lr_n=1.6e6, sigma_n=2e5, train_minutes=0)) == RunState(300, 1.6e6, 2e5)


def test_resume_equals_uninterrupted_run(data, tmp_path):
    train.main(args(data, tmp_path, "whole", 6))
    train.main(args(data, tmp_path, "parts", 3))
    train.main(args(data, tmp_path, "parts", 6, "--resume"))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["optimizer"]["state"], a["optimizer"]["state"], atol=1e-5, rtol=0)


def test_resume_refuses_other_model_flags(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "run", 3))
    with pytest.raises(SystemExit) as e:
        train.main(args(data, tmp_path, "run", 6, "--resume", "--layers", "3"))
    assert e.value.code == 1
    assert "--layers 3 differs from the run being resumed (2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a fresh run into the same folder would mix two runs
        train.main(args(data, tmp_path, "run", 6))
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_leaves_loadable_checkpoint_and_resume_matches(data, tmp_path):
    full = args(data, tmp_path, "killed", 15)
    full[full.index("--save_interval") + 1] = "5"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *full], cwd=tmp_path,
                            env=paused_env("step 7"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_paused(proc.pid, proc)
    proc.send_signal(signal.SIGKILL)  # mid-run, between checkpoints
    proc.wait()
    assert weights(tmp_path / "killed")["step"] == 5  # loadable (atomic writes), not finished
    train.main(full + ["--resume"])
    whole = list(full)
    whole[whole.index("--log_dir") + 1] = "whole"
    train.main(whole)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=0)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    real = train.pixel_sigma
    monkeypatch.setattr(train, "pixel_sigma", lambda step, *a: 0.0 if step >= 4 else real(step, *a))  # log 0
    run_args = args(data, tmp_path, "nan", 6)
    run_args[run_args.index("--save_interval") + 1] = "2"
    with pytest.raises(SystemExit) as e:
        train.main(run_args)
    assert e.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # past tqdm's bar
    assert len(err) == 1 and "step 4: the loss is not finite" in err[0] and "latest.pt (step 4)" in err[0]
    ckpt = weights(tmp_path / "nan")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_default_job_renders_builtin_data_once(tmp_path, monkeypatch, capsys):
    tiny_default_job(monkeypatch, tmp_path)
    train.main([])
    out = capsys.readouterr().out
    assert "default job" in out and "Rendering the built-in data set" in out
    assert (tmp_path / "runs" / "default" / "samples.png").exists()
    assert weights(tmp_path / "runs" / "default")["step"] == 2
    shard = tmp_path / "data" / "builtin" / "shepard_metzler_3_parts" / "train" / "001-of-001.pt"
    mtime = shard.stat().st_mtime_ns
    train.main(["--log_dir", "again"])
    assert "Using the built-in data set" in capsys.readouterr().out and shard.stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------------------------ bad input

def small_set(folder, size):
    """One converted shard of 2 scenes x 3 views of `size`x`size` images."""
    from gqn_dataset import write_shard

    def jpeg():
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="JPEG")
        return buf.getvalue()

    write_shard(os.path.join(folder, "001-of-001.pt"), [[jpeg() for _ in range(3)] for _ in range(2)],
                np.zeros((2, 3, 7), np.float32), "shepard_metzler_3_parts", size)
    return str(folder)


def test_bad_input_gets_one_clear_line(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("not GQN data")
    small = small_set(tmp_path / "small", 32)
    good = ["--root_log_dir", str(tmp_path / "runs"), *TINY, "--gradient_steps", "1"]
    cases = [
        (["--train_data_dir", str(tmp_path / "missing"), "--test_data_dir", data[1]], "--train_data_dir",
         str(tmp_path / "missing")),
        (["--train_data_dir", data[0], "--test_data_dir", str(empty)], "--test_data_dir", str(empty)),
        (["--train_data_dir", str(unrelated), "--test_data_dir", data[1]], "--train_data_dir", str(unrelated)),
        (["--train_data_dir", data[0], "--test_data_dir", small], "--test_data_dir", "32x32"),
        (["--train_data_dir", data[0]], "--test_data_dir", "missing"),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--dataset", "Jaco"], "--dataset Jaco", ""),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--batch_size", "0"], "--batch_size", "'0'"),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--shared_core", "yes please"], "--shared_core",
         "True/False"),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--representation", "cnn"], "--representation",
         "cnn"),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--image_size", "30"], "--image_size", "30"),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--learning_rate", "1"], "--learning_rate", ""),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--fov", "200", "--representation", "volume"],
         "--fov", "200"),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--min_context", "4", "--max_context", "2"],
         "--min_context 4", "--max_context 2"),
        (["--train_data_dir", data[0], "--test_data_dir", data[1], "--near", "4", "--far", "3", "--representation",
          "volume"], "--near 4.0", "far"),
        (["--resume", "--log_dir", "nothing_here"], "--resume", "latest.pt"),
    ]
    # The command line itself for a few (exit status, no traceback from the interpreter); main() for the rest.
    for i, (argv, flag, detail) in enumerate(cases):
        if i in (0, 3, 7, 10):
            script_error(run_script("train.py", *good, *argv, cwd=tmp_path), flag, detail)
        else:
            main_error(train.main, [*good, *argv], capsys, flag, detail)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("latest.pt"))


def test_engineering_flags_reach_the_model(data, tmp_path, monkeypatch):
    # A half precision the CPU would emulate is refused (test_speed_and_precision.py); on a CPU with neither (AVX2
    # only) the refusal is told float16 is there: this tiny model's two steps are slow, not wrong.
    amp = "bf16" if cpu_has_bf16() else "fp16"
    if not distributed.cpu_has_fp16():
        monkeypatch.setattr(distributed, "cpu_has_fp16", lambda: True)
    train.main(args(data, tmp_path, "flags", 2, "--amp", amp, "--checkpoint_activations", "True",
                    "--shared_core", "1", "--representation", "tower", "--grad_clip", "1.0"))
    ckpt = weights(tmp_path / "flags")
    assert ckpt["step"] == 2 and ckpt["config"]["amp"] == amp
    cfg = ckpt["model_config"]
    assert cfg["checkpoint_activations"] is True and cfg["shared_core"] is True and cfg["representation"] == "tower"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_volume_representation_and_its_cameras_reach_the_model(data, tmp_path, capsys):
    train.main(args(data, tmp_path, "volume", 2, "--representation", "volume", "--fov", "20", "--near", "3",
                    "--far", "3.6"))
    cfg = weights(tmp_path / "volume")["model_config"]
    assert (cfg["representation"], cfg["fov"], cfg["near"], cfg["far"]) == ("volume", 20.0, 3.0, 3.6)
    # a camera model that does not fit the data's recorded one (fov 20, depths 2.7-3.97) is refused in one line
    main_error(train.main, args(data, tmp_path, "fov", 2, "--representation", "volume", "--fov", "25"), capsys,
               "--fov 25: the data's cameras have a field of view of 20 degrees")
    main_error(train.main, args(data, tmp_path, "far", 2, "--representation", "volume", "--near", "4", "--far", "6"),
               capsys, "--near 4 --far 6: the data's scenes lie between 2.7")


def test_channels_last_trains_the_same_model_and_resumes(data, tmp_path):
    """--channels_last changes the memory layout only: the same weights after 6 steps, also when the run
    is stopped after 3 and resumed (Adam's state reloaded into the NHWC layout)."""
    train.main(args(data, tmp_path, "nchw", 6, "--representation", "tower"))
    train.main(args(data, tmp_path, "nhwc", 3, "--representation", "tower", "--channels_last"))
    train.main(args(data, tmp_path, "nhwc", 6, "--resume", "--channels_last"))
    a, b = weights(tmp_path / "nchw"), weights(tmp_path / "nhwc")
    assert b["step"] == 6 and b["config"]["channels_last"] is True
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compile_trains_on_the_cpu_as_eager_does(data, tmp_path):
    """train.py --compile on the CPU (inductor, C++ code generation: about a minute to compile on 2 cores): the
    same losses as without, to the reordering of float operations a compiler may do."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        train.main(args(data, tmp_path, name, 2, "--log_interval", "1", "--batch_threads", "1", *extra))
    logged = {}
    for name in ("eager", "compiled"):
        acc = EventAccumulator(str(tmp_path / name))
        acc.Reload()
        logged[name] = [e.value for tag in ("train/elbo", "train/kl", "test/elbo") for e in acc.Scalars(tag)]
    assert logged["compiled"] == pytest.approx(logged["eager"], rel=1e-4)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert not any(k.startswith("_orig_mod.") for k in b["model"])
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-4, rtol=0)
