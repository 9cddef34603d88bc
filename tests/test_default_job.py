"""The README's main command end to end: `python train.py` with no data, as a newcomer runs it (fewer steps).

Real built-in data settings and the real cpu preset; only the time budget is cut (so that CI can afford it), which
also walks the path where the run times its first 200 steps and fixes its length. The full run (8.5 minutes of
training) is measured in the README.
"""
import json

import pytest
import torch

from conftest import run_script


@pytest.mark.slow
def test_python_train_py_with_no_data_then_evaluate(tmp_path):
    # a budget of 1.2 s, spent before the clock has timed its 200 steps: the run stops one step later, at 201
    r = run_script("train.py", "--gradient_steps", "300", "--train_minutes", "0.02", "--log_interval", "50",
                   cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "default job" in r.stdout and "Rendering the built-in data set" in r.stdout
    assert "Test split (500 scenes, 3 context views)" in r.stdout  # scored at the end, as evaluate.py does
    run = tmp_path / "runs" / "default"
    assert (run / "samples.png").stat().st_size > 0 and (run / "config.json").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 201 and ckpt["model_config"]["representation"] == "volume"
    assert "Timed the first 200 steps" in r.stdout and ckpt["state"]["steps"] == 201  # the bound: 300
    assert ckpt["config"]["gradient_steps"] == 300 and json.loads((run / "config.json").read_text())["state"] == \
        ckpt["state"]
    assert "201 steps are fewer than the shortest default job measured" in r.stdout  # budget.expectation

    data = tmp_path / "data" / "builtin" / "shepard_metzler_5_parts"
    out = tmp_path / "eval.json"
    e = run_script("evaluate.py", "--checkpoint", run / "checkpoints" / "latest.pt", "--test_data_dir",
                   data / "test", "--train_data_dir", data / "train", "--max_scenes", "64", "--json", out)
    assert e.returncode == 0, e.stderr[-3000:]
    scores = json.loads(out.read_text())
    assert scores["scenes"] == 64 and 0 < scores["rmse"] < 255 and scores["mean_image_rmse"] > 0
