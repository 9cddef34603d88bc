"""hubconf.py: torch.hub.load(..., source="local") gives a ready model from any working directory; its render helper
takes context views of any size and a camera as a pose, a position and a point to look at, or yaw/pitch/distance."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SIZE, make_checkpoint

SCRIPT = """
import json, sys, numpy as np, torch
root, ckpt = sys.argv[1:]
model = torch.hub.load(root, "gqn", source="local", checkpoint=ckpt)
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2)]   # HWC, not the model's size
poses = [[0, -3, 0, 1.5708, 0], [3, 0, 0, 3.1416, 0]]                           # 5 raw numbers each
a = model.render(images, poses, yaw=30, pitch=20, distance=3.0, seed=1)
sys.path.insert(0, root)   # the hub leaves no module of the repository behind: import its camera helpers
import cameras, math
pose = cameras.look_at(3.0, torch.tensor([math.radians(30)]), torch.tensor(math.radians(20)))[0]
b = model.render(images, poses, pose=pose, seed=1)
c = model.render(images, poses, position=pose[:3], seed=1)
s = model.render([torch.from_numpy(i).permute(2, 0, 1) for i in images], poses, pose=pose, samples=3, seed=1)
print(json.dumps(dict(shape=list(a.shape), samples=list(s.shape), ab=float((a - b).abs().max()),
                      ac=float((a - c).abs().max()), first=float((s[0] - b).abs().max()),
                      lo=float(a.min()), hi=float(a.max()), training=model.training)))
"""


def test_torch_hub_load_from_another_directory_renders_a_camera_of_ones_choosing(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the repository on the path
    r = subprocess.run([sys.executable, "-c", SCRIPT, ROOT, str(ckpt)], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["shape"] == [3, SIZE, SIZE] and out["samples"] == [3, 3, SIZE, SIZE]
    assert out["ab"] < 1e-5 and out["ac"] < 1e-4 and out["first"] < 1e-5  # one camera, three ways to give it
    assert 0 <= out["lo"] <= out["hi"] <= 1 and out["training"] is False


CALLER = """
import json, sys, torch
root, ckpt, order = sys.argv[1:]
path_before = list(sys.path)
if order == "mine first":
    import model                                   # the caller's own model.py, as many ML projects have
    mine = model
hub = torch.hub.load(root, "gqn", source="local", checkpoint=ckpt)
view = hub.render([torch.rand(3, 16, 16)], [[0, -3, 0, 1.5708, 0]], yaw=30, pitch=20, distance=3.0)
import model, checkpoint                           # after the hub: still the caller's
print(json.dumps(dict(view=list(view.shape), model=model.__file__, checkpoint=checkpoint.__file__,
                      same=order != "mine first" or model is mine, who=model.WHO, path=sys.path == path_before,
                      hub_model=type(hub).__module__)))
"""


@pytest.mark.parametrize("order", ["mine first", "hub first"])
def test_hub_leaves_the_callers_own_modules_alone(tmp_path, order):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    project = tmp_path / "project"
    project.mkdir()
    (project / "model.py").write_text("WHO = 'the caller'\n")         # names the repository uses too
    (project / "checkpoint.py").write_text("WHO = 'the caller'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", CALLER, ROOT, str(ckpt), order], cwd=project, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["view"] == [3, SIZE, SIZE] and out["who"] == "the caller" and out["same"] and out["path"]
    assert out["model"] == str(project / "model.py") and out["checkpoint"] == str(project / "checkpoint.py")
    assert out["hub_model"] == "model"  # the hub's GQN is the repository's class, whatever sys.modules holds
