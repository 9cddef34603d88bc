"""GQN training checkpoints: atomic writes, loading, and rebuilding the model they hold.

A checkpoint is what train.py needs to continue the paper's training procedure (Eslami et al. 2018,
supplementary "Training": Adam with annealed learning rate and pixel sigma, both functions of the step alone),
stored as a dict of plain types and tensors that loads with `torch.load(path, weights_only=True)`; train.py writes
it through `training_checkpoint` and reads it back through `restore` and `saved_state`, nowhere else:
    {"model": state_dict (no `module.`/`_orig_mod.` prefixes), "model_config": GQN kwargs, "optimizer": Adam's
     state_dict, "scaler": fp16's GradScaler state_dict ({} otherwise), "step": completed gradient steps,
     "config": the run's Config (config.py, plain types), "state": its RunState (the length and the schedules'
     counts; older checkpoints kept them in "config"), "data": {"dataset", "image_size", "max_context",
     "train_layout", "test_layout" (the files of each split folder when the run began: GQNDataset.layout)},
     "rng": {"torch", "cuda", "numpy", "python"}, "bad_scenes": unreadable scene reads skipped so far}
Files: <run>/checkpoints/latest.pt and <run>/checkpoints/step_00001000.pt; what a run folder offers --resume
(run_to_resume), keeping the newest numbered ones, and the way back from a damaged latest.pt. Other commands read
only "model", "model_config", "step", "config" and "data".

    from checkpoint import load_checkpoint, build_model
    ckpt = load_checkpoint("runs/default/checkpoints/latest.pt")
    model = build_model(ckpt).eval()
    model, ckpt = load_model("runs/default/checkpoints/latest.pt", device)   # the same, errors as one line
"""
import io
import os
import random
import re

import numpy as np
import torch

from cli import UserError
from files import atomic_write
from model import GQN


class CheckpointError(UserError, ValueError):
    """A file that is not a loadable GQN checkpoint; the message names it."""


def checkpoint_paths(run_dir, step=None):
    """(folder, latest.pt path, step-numbered path or None) of a run folder."""
    folder = os.path.join(run_dir, "checkpoints")
    numbered = os.path.join(folder, f"step_{step:08d}.pt") if step is not None else None
    return folder, os.path.join(folder, "latest.pt"), numbered


def numbered(folder):
    """The numbered checkpoints of a checkpoints folder, oldest first -> [(step, path)]."""
    if not os.path.isdir(folder):
        return []
    steps = [(int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder)
             if (m := re.fullmatch(r"step_(\d+)\.pt", n))]
    return sorted(steps)


def keep_newest(folder, keep):
    """Delete all but the `keep` newest numbered checkpoints (keep < 0: keep all). latest.pt is never touched."""
    steps = numbered(folder)
    for _, path in steps[:max(0, len(steps) - keep)] if keep >= 0 else []:
        os.unlink(path)


def newest_loadable(folder):
    """The newest numbered checkpoint of the folder that loads, or None (a damaged latest.pt's way back)."""
    for _, path in reversed(numbered(folder)):
        try:
            load_checkpoint(path)
            return path
        except CheckpointError:
            continue
    return None


def way_back(path, advice):
    """For a checkpoint that does not load: "; the newest loadable one beside it is X: <advice(X)>", or ""."""
    back = newest_loadable(os.path.dirname(os.path.abspath(path))) if os.path.isfile(path) else None
    return f"; the newest loadable checkpoint beside it is {back}: {advice(back)}" if back else ""


def run_to_resume(run_dir, resume):
    """What a run folder offers --resume (False, True or "auto") -> the checkpoint to continue, or None to start.

    "auto" continues the folder's run if it holds one and starts one if not, so that a requeued job or a torchrun
    restart can repeat its command line. A damaged latest.pt is never trusted nor silently replaced.
    """
    folder, latest, _ = checkpoint_paths(run_dir)
    holds_run = os.path.exists(latest) or bool(numbered(folder))
    if not resume or (resume == "auto" and not holds_run):
        if holds_run:
            raise UserError(f"--log_dir {run_dir} already holds a run ({folder}): pass --resume to continue that run "
                            f"with its own settings, or another --log_dir to start a new one")
        return None
    if not os.path.exists(latest):
        raise UserError(f"--resume: {latest} does not exist (no run to continue in {run_dir})"
                        + way_back(latest, lambda back: f"copy it to latest.pt (cp {back} {latest})"))
    try:
        return load_checkpoint(latest)
    except CheckpointError as e:
        raise UserError(f"--resume: {e}" + way_back(latest, lambda back: f"copy it over latest.pt (cp {back} {latest}) "
                                                                          f"and run again")) from None


def save_checkpoint(ckpt, paths):
    """Serialise once, write atomically to every path (latest.pt and, every save_interval, a numbered one)."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    data = buf.getvalue()
    for i, path in enumerate(paths):
        try:
            atomic_write(path, data)
        except OSError as e:  # disk full, a file size limit, permission lost, the folder removed
            kept = ("the checkpoint before it is as it was" if i == 0 else
                    f"{os.path.basename(paths[0])} holds this step")
            raise UserError(f"{path}: cannot write the checkpoint ({e.strerror or e}); the run stops here, and "
                            f"{kept}") from None


def training_checkpoint(step, model, optimizer, scaler, cfg, state, data, bad_scenes):
    """The checkpoint of a run at `step` (the schema above): `model` the raw module, `data` what the run was resolved
    with (resolve.Resolved: its data sets and K)."""
    record = {"dataset": cfg.dataset, "image_size": int(data.train_ds.image_size),
              "max_context": int(data.max_context), "train_layout": data.train_ds.layout,
              "test_layout": data.test_ds.layout}
    return {"model": model.state_dict(), "model_config": dict(model.config), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": int(step), "config": cfg.to_dict(), "state": state.to_dict(),
            "data": record, "rng": rng_state(), "bad_scenes": int(bad_scenes)}


def restore(ckpt, model, optimizer, scaler):
    """Weights, Adam's state and fp16's loss scale from a checkpoint (on the CPU) -> the step it holds."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["step"])


def saved_state(ckpt):
    """The RunState a checkpoint holds; a checkpoint of an older version kept it in its config: the length in
    gradient_steps, the schedules' counts in lr_n/sigma_n (a share or 0 until the budget had fixed them), timed_ms."""
    from config import RunState

    if "state" in ckpt:
        return RunState(**ckpt["state"])
    saved = ckpt["config"]
    resolved = {k: saved[k] for k in ("lr_n", "sigma_n") if saved[k] >= 1}
    return RunState(int(saved["gradient_steps"]), timed_ms=saved.get("timed_ms", 0.0), **resolved)


def load_checkpoint(path, map_location="cpu"):
    """torch.load(path, weights_only=True) -> checkpoint dict; CheckpointError naming the file if it is not one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not zipped:  # torch.load reads any other file as a legacy pickle stream, allocating the lengths it states
        raise CheckpointError(f"{path}: not a loadable checkpoint, damaged or not one (not torch.save's zip format)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign file: name the file, not where torch failed
        raise CheckpointError(f"{path}: not a loadable checkpoint, damaged or not one ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "step"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a GQN checkpoint (no 'model', 'model_config' and 'step')")
    wrong = _wrong_field(ckpt)
    if wrong:
        raise CheckpointError(f"{path}: not a GQN checkpoint ({wrong})")
    return ckpt


def _wrong_field(ckpt):
    """What is wrong with the fields that the commands read from a checkpoint (a damaged one can hold any types), or
    None: model a dict of tensors, model_config a dict, step a count, config and data dicts, data's sizes ints."""
    if not (isinstance(ckpt["model"], dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in ckpt["model"].items())):
        return "'model' is not a dict of tensors"
    if not (isinstance(ckpt["model_config"], dict) and all(isinstance(k, str) for k in ckpt["model_config"])):
        return "'model_config' is not a dict"
    if type(ckpt["step"]) is not int or ckpt["step"] < 0:
        return f"'step' is {type(ckpt['step']).__name__}, not a count"
    for key in ("config", "data", "state"):
        if not isinstance(ckpt.get(key) or {}, dict):
            return f"'{key}' is not a dict"
    state = ckpt.get("state") or {}
    if state and not (set(state) <= {"steps", "lr_n", "sigma_n", "timed_ms"} and type(state.get("steps")) is int
                      and state["steps"] >= 1 and all(v is None or type(v) in (int, float) for v in state.values())):
        return "'state' is not a run's state"
    for key in ("image_size", "max_context"):
        value = (ckpt.get("data") or {}).get(key)
        if value is not None and (type(value) is not int or value < 1):
            return f"data's '{key}' is not a positive integer"
    return None


def build_model(ckpt):
    """The GQN a checkpoint holds, weights loaded (on the CPU, in training mode: call .to()/.eval() as needed)."""
    _check_fit(ckpt["model_config"], ckpt["model"])
    model = GQN(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model


# The most bytes a checkpoint's model may ask one scene's forward pass to hold: this machine's memory.
MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 2 ** 40
SIZES = {"L": 12, "h_dim": 128, "z_dim": 3, "u_dim": 128, "r_dim": 256, "image_size": 64,  # GQN's defaults
         "depth_samples": 16, "cell_rays": 2}


def scene_bytes(config, views=3):
    """About the float32 bytes one scene's forward pass holds for autograd at the sizes a model_config declares:
    each of the L steps' gates, states, prior, posterior and z at a quarter of the image size, the canvas, r, and
    the volume's samples along the query rays."""
    g = {k: config.get(k, v) for k, v in SIZES.items()}
    q = g["image_size"] // 4
    steps = g["L"] * (8 * g["h_dim"] + 6 * g["z_dim"]) * q * q
    rays = (g["cell_rays"] * q) ** 2
    volume = rays * g["depth_samples"] * views * 40 if config.get("representation") == "volume" else 0
    return 4 * (steps + 2 * g["u_dim"] * g["image_size"] ** 2 + views * g["r_dim"] * q * q + volume)


def _check_size(config):
    """ValueError naming the size that makes one scene's forward pass hold more than this machine's memory."""
    sizes = {k: config.get(k, v) for k, v in SIZES.items()}
    if not all(type(v) is int and v > 0 for v in sizes.values()):
        return  # GQN's own checks name a size that is not one
    need = scene_bytes(config)
    if need > MEMORY:
        k = max(sizes, key=lambda k: sizes[k] / SIZES[k])
        raise ValueError(f"{k} {sizes[k]}: one scene's forward pass would hold about {need / 2**30:.3g} GiB, more "
                         f"than this machine's {MEMORY / 2**30:.3g} GiB")


def _check_fit(config, weights):
    """Raise ValueError unless model_config builds a model whose weights have the checkpoint's shapes, checked on
    the meta device, where building allocates nothing: a damaged config (h_dim 10**6, L 10**9) is refused before
    it allocates, or loops, far beyond what the file holds; and so is one whose sizes (a shared core's L 10**9)
    would make a single scene's forward pass outgrow the machine's memory."""
    _check_size(config)
    if not config.get("shared_core", False) and not (isinstance(config.get("L", 12), int)
                                                     and config.get("L", 12) <= len(weights)):
        raise ValueError(f"L {config.get('L')!r}: more steps than the checkpoint has weights")  # each step has its own
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GQN(**config).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    if want != have:
        k = min(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise ValueError(f"{k}: the config makes {want.get(k)}, the weights hold {have.get(k)}")


def load_model(path, device="cpu", flag="--checkpoint"):
    """Rebuild the GQN a checkpoint holds -> (model in eval mode on device, checkpoint dict).

    Errors name the flag that gave the path (CheckpointError: `--checkpoint PATH: ...`).
    """
    try:
        ckpt = load_checkpoint(path)
        model = build_model(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{flag} {e}{way_back(path, lambda back: f'pass {flag} {back}')}") from None
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as e:  # model_config or weights from another version
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{flag} {path}: weights do not fit its model_config ({first})") from None
    return model.to(device).eval(), ckpt


def recorded_folder(recorded, near, flag):
    """A data folder a checkpoint records (an absolute path), found again after the run or its data moved: the path
    itself, else the longest of its trailing parts (data/builtin/<name>/test, ..., <name>/test) found under the
    working directory or a folder above `near` (the run's checkpoint). UserError naming `flag` when none is there."""
    if os.path.isdir(recorded):
        return recorded
    parts = os.path.normpath(recorded).split(os.sep)[1:]
    bases = [os.getcwd()]
    folder = os.path.dirname(os.path.abspath(near))
    while folder not in bases and folder != os.path.dirname(folder):
        bases.append(folder)
        folder = os.path.dirname(folder)
    # the longest trailing part first, the most of the recorded layout kept; at least <data set>/<split>: a bare
    # `test` folder nearby is not this run's data
    for k in range(1, len(parts) - 1):
        for base in bases:
            candidate = os.path.join(base, *parts[k:])
            if os.path.isdir(candidate):
                return candidate
    raise UserError(f"{flag}: the run's data folder {recorded} is not there, nor beside the run (was it moved?): "
                    f"pass {flag} with its place")


def run_seed(ckpt):
    """The --seed of the run a checkpoint comes from (0 for a checkpoint that records none): evaluate.py and render.py
    choose views and noise with it unless told otherwise, as train.py's end-of-run scores did."""
    seed = (ckpt.get("config") or {}).get("seed", 0)
    return int(seed) if isinstance(seed, int) and seed >= 0 else 0


def input_size(ckpt, ds, folder, flag):
    """Check that the checkpoint's model can read this data set; the model's image size (data resized to it)."""
    cfg = ckpt["model_config"]
    size = int(cfg.get("image_size", 64))
    trained_on = int((ckpt.get("data") or {}).get("image_size", size))
    v_dim = int(cfg.get("v_dim", 7))
    channels = int(cfg.get("x_channels", 3))
    if v_dim != 7:
        raise UserError(f"{flag} {folder}: viewpoints are 7-d (x, y, z, sin/cos yaw, sin/cos pitch) but the "
                        f"checkpoint's model takes {v_dim}-d viewpoints")
    if channels != 3:
        raise UserError(f"{flag} {folder}: images have 3 channels but the checkpoint's model takes {channels}")
    # Resizing is only faithful when it repeats what training did; other sizes would score a model on
    # inputs it never saw, so they are refused rather than silently interpolated.
    if ds.image_size != size and ds.image_size != trained_on:
        raise UserError(f"{flag} {folder}: images are {ds.image_size}x{ds.image_size} but the checkpoint's "
                        f"model takes {size}x{size} (trained on {trained_on}x{trained_on} data)")
    return size


def rng_state():
    """Every RNG state, as plain types and tensors (weights_only-loadable).

    Training draws nothing from them (views and noise are pure functions of seed, step and scene), so they
    are kept for completeness: code that does draw from the global RNGs continues where it stopped.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_py = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": [version, list(state), gauss_py]}


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, state, gauss_py = rng["python"]
    random.setstate((version, tuple(state), gauss_py))
