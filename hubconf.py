"""PyTorch Hub entry point: a trained GQN (Eslami et al. 2018) one line away, from any working directory.

    import torch
    model = torch.hub.load("path/to/this/repo", "gqn", source="local",
                           checkpoint="path/to/this/repo/runs/default/checkpoints/latest.pt")
    view = model.render(images, poses, yaw=30, pitch=20, distance=3.3)   # (3, H, W) in [0, 1]

`images` are the context views of one scene (any size: resized as training resized them) and `poses` their
cameras; `model.render` draws the scene from a new camera with the generation core (figure S2, z from the prior).

The repository's modules have flat names (model, checkpoint, config, cameras, ...) that a caller's own project may
use too. They are imported here without touching the caller's: whatever of those names the caller has imported is
set aside while ours load from this folder, then put back, and ours leave sys.modules again (the functions below
keep them). `import model` after torch.hub.load is the caller's model.py, and a caller's model.py imported before
does not stand in for ours.
"""
import functools
import importlib
import math
import os
import sys

import numpy as np
import torch

dependencies = ["torch", "numpy", "PIL", "simplejpeg"]
HERE = os.path.dirname(os.path.abspath(__file__))


def _ours(module):
    return os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or "/")) in (
        HERE, os.path.join(HERE, "dataset"))


def _import_ours(*names):
    """The project's modules `names`, imported from this folder, with sys.modules and sys.path left as they were."""
    flat = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")} | {"dataset"}
    before = dict(sys.modules)
    path = list(sys.path)
    for name in [n for n in sys.modules if n.split(".")[0] in flat]:
        del sys.modules[name]  # a caller's module of the same name must not stand in for ours
    sys.path.insert(0, HERE)
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        for name in [n for n in sys.modules if n not in before or sys.modules[n] is not before[n]]:
            if _ours(sys.modules[name]) or name.split(".")[0] in flat:
                del sys.modules[name]
        sys.modules.update({n: m for n, m in before.items() if n not in sys.modules})
        sys.path[:] = path


cameras, _checkpoint, _model = _import_ours("cameras", "checkpoint", "model")
load_model, resize = _checkpoint.load_model, _model.resize


def gqn(checkpoint, device="cpu"):
    """The GQN a train.py checkpoint holds, in eval mode on `device`, with `model.render` (hubconf.render)."""
    model, _ = load_model(checkpoint, device, flag="checkpoint")
    model.render = functools.partial(render, model)
    return model


def as_images(images, size):
    """Context views (a list of PIL images, HxWx3 uint8 arrays or 3xHxW tensors; or one stacked array) of any size
    -> float (K, 3, size, size) in [0, 1], area-resized as training resizes stored images."""
    out = []
    for img in images:
        t = torch.as_tensor(np.asarray(img))
        if t.ndim != 3:
            raise ValueError(f"a context view must be an image with 3 colour channels, got shape {tuple(t.shape)}")
        if t.shape[-1] == 3 and t.shape[0] != 3:
            t = t.permute(2, 0, 1)  # HWC -> CHW
        t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
        out.append(resize(t, size))
    return torch.stack(out)


def as_poses(poses):
    """(N, 7) DeepMind poses or (N, 5) raw cameras (x, y, z, yaw, pitch in radians) -> float (N, 7)."""
    poses = torch.as_tensor(np.asarray(poses), dtype=torch.float32).reshape(-1, np.shape(poses)[-1])
    return cameras.pose7(poses) if poses.shape[-1] == 5 else poses


@torch.no_grad()
def render(model, images, poses, pose=None, position=None, look_at=(0.0, 0.0, 0.0), yaw=None, pitch=None,
           distance=None, samples=1, seed=0):
    """The scene seen in `images` (K views, with `poses` (K, 7 or 5)) from a new camera, given as one of:
      pose      its 7-d pose (or 5 raw numbers);
      position  where it stands, looking at `look_at` (the scene's centre, the origin, by default);
      yaw, pitch, distance   degrees and scene units, looking at the origin, as DeepMind places its cameras.
    -> float (3, H, W) in [0, 1] at the model's size; (samples, 3, H, W) with `samples` > 1 (z drawn each time:
    where they differ, the model is unsure). The same seed gives the same picture.
    """
    if pose is not None:
        v_q = as_poses(pose)
    elif position is not None:
        v_q = cameras.pose_from_to(position, look_at)
    elif yaw is not None and pitch is not None and distance is not None:
        v_q = cameras.look_at(float(distance), torch.tensor([math.radians(yaw)]), torch.tensor(math.radians(pitch)))
    else:
        raise ValueError("give the camera as pose=..., position=... (and look_at=...), or yaw=, pitch= and distance=")
    device = next(model.parameters()).device
    x, v = as_images(images, model.config["image_size"]).to(device), as_poses(poses).to(device)
    if len(x) != len(v):
        raise ValueError(f"{len(x)} context views but {len(v)} poses")
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.cat([model.generate(x[None], v[None], v_q.to(device), generator=g) for _ in range(samples)])
    return out.clamp(0, 1).cpu().squeeze(0)
