"""Train a Generative Query Network: the procedure of Eslami et al. 2018, supplementary section "Training".

Each step takes B scenes; per scene M context views (x, v), M uniform in 1..K, and one other view as the query
(x_q, v_q) (gqn_dataset.TrainBatches). The loss is the negative ELBO, KL(posterior || prior) + NLL of x_q under
a Gaussian of pixel std sigma, in nats per image. Adam (0.9, 0.999, 1e-8), batch 36, 2M steps; the learning rate
anneals 5e-4 -> 5e-5 over 1.6M steps and sigma 2.0 -> 0.7 over 200K (scheduler.py). All randomness (scenes, views,
the posterior's noise eps) is a pure function of (seed, step, scene): a resumed run, or a run over several
processes, computes exactly what one uninterrupted process computes.

    python train.py                                            # default job: built-in data, 'cpu' preset
    python train.py --train_data_dir D/train --test_data_dir D/test            # the paper's configuration
    python train.py --train_data_dir D/train --test_data_dir D/test --device_ids 0 1 2 3    # nn.DataParallel
    torchrun --nproc_per_node 4 train.py --train_data_dir D/train --test_data_dir D/test    # DDP, one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT train.py ...
    python train.py ... --resume                               # continue <root_log_dir>/<log_dir>

Run folder <root_log_dir>/<log_dir>/: config.json, TensorBoard events, checkpoints/ (latest.pt, step_*.pt),
samples.png (ground truth next to generated views, written at the end).
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

# OpenMP threads that spin while waiting made CPU training 5x slower whenever another process shared the cores
# (2.2 s instead of 0.43 s a step of the cpu preset on 2 busy cores); sleeping waits cost little when idle.
# Read when torch loads OpenMP, so set before importing it; an OMP_WAIT_POLICY of the user's own wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from checkpoint import (CheckpointError, atomic_write, checkpoint_paths, load_checkpoint, rng_state,  # noqa: E402
                        save_checkpoint, set_rng_state)
from scheduler import learning_rate, pixel_sigma  # noqa: E402


class UserError(Exception):
    """Bad input (flag, folder, run state): main() prints it as one `error: ...` line and exits 1."""


class NonFiniteLoss(Exception):
    """The loss stopped being a number; the weights were not updated with it."""


# ------------------------------------------------------------------------------------------------ configuration

@dataclass
class Config:
    """One run, fully resolved. The defaults are the paper's configuration (the 'paper' preset)."""
    # Data (torch-gqn's flags)
    train_data_dir: str = ""
    test_data_dir: str = ""
    dataset: str = ""                    # "" = the name the data records; sets K, the maximum context size
    min_context: int = 1                 # context views per training scene: uniform in min_context..max_context
    max_context: int = 0                 # 0 = K, the data set's (the paper draws 1..K)
    # Model: GQN(representation, L, shared_core, ...) (model.py)
    representation: str = "pool"
    layers: int = 12                     # L, generation steps
    shared_core: bool = False
    r_dim: int = 256
    h_dim: int = 128
    z_dim: int = 3
    u_dim: int = 128
    image_size: int = 64                 # the model's; stored images of another size are resized (area)
    fov: float = 20.0                    # representation "volume" only: the cameras' field of view in degrees,
    near: float = 2.7                    # and the depths along the query rays that it samples (the defaults fit
    far: float = 3.97                    # Shepard-Metzler: cameras 10/3 from the object's centre)
    # Optimisation (supplementary "Training")
    gradient_steps: int = 2_000_000
    batch_size: int = 36                 # global: split across DDP ranks / DataParallel devices
    lr_i: float = 5e-4
    lr_f: float = 5e-5
    lr_n: float = 1.6e6
    sigma_i: float = 2.0
    sigma_f: float = 0.7
    sigma_n: float = 2e5
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 0.0               # max gradient norm; 0 = off (the paper does not clip)
    # Run
    seed: int = -1                       # -1 = draw one (recorded in config.json and the checkpoints)
    root_log_dir: str = "runs"
    log_dir: str = "default"
    log_interval: int = 100
    save_interval: int = 10_000
    workers: int = 4
    device_ids: list = field(default_factory=lambda: [0])
    amp: str = "none"                    # "bf16": autocast to bfloat16 (loss in float32)
    compile: bool = False
    checkpoint_activations: bool = False
    channels_last: bool = False          # NHWC activations and weights (GPUs' fast convolution layout)
    preset: str = "paper"
    resume: bool = False


# >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>> CPU PRESET (the default job) >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>
# `python train.py` without data folders: a GQN small enough for a 2-core CPU, trained on the built-in
# Shepard-Metzler set within 15 minutes, rendering included. Schedules are the paper's, shortened to the run's length.
# BUILTIN_DATA is rendered once into data/<name>; delete that folder after changing it.
# Tuned on held-out RMSE (evaluate.py): the paper's representations (pool, tower, pyramid) must learn 3D geometry
# from scratch and were still at 0.93x the mean image's RMSE after this budget; the volume representation reads the
# context along the query rays with the cameras' geometry and gets under 0.8x. Training uses exactly the 3 context
# views the test uses (1-14 views made a step 3.4x slower here and did not help the tower). Small batches buy
# more steps; sigma anneals over the whole run, since a low sigma early makes the model lean on z before its prior
# can predict it, and prior samples then miss the query view.
CPU_PRESET = dict(
    representation="volume", layers=4, r_dim=64, h_dim=32, z_dim=3, u_dim=32, image_size=32,
    min_context=3, max_context=3,
    gradient_steps=4000, batch_size=8, lr_i=1e-3, lr_f=1e-4, lr_n=4000, sigma_i=2.0, sigma_f=0.7, sigma_n=4000,
    log_interval=100, save_interval=500, workers=0, seed=0,
)
BUILTIN_DATA = dict(parts=5, train_scenes=5000, test_scenes=500, seed=0, workers=2)
# <<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<< end of CPU PRESET <<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<

PRESETS = {"paper": {}, "cpu": CPU_PRESET}

# torch-gqn's --dataset names and the DeepMind data sets they stand for (same K within a family).
TORCH_GQN_NAMES = {
    "room": ("rooms_ring_camera", "rooms_free_camera_no_object_rotations",
             "rooms_free_camera_with_object_rotations"),
    "jaco": ("jaco",),
    "labyrinth": ("mazes",),
    "shepard-metzler": ("shepard_metzler_5_parts", "shepard_metzler_7_parts"),
}
# What may differ from the checkpoint's config on --resume: where the data is and how the run is carried out, not
# the model, the data set or the optimisation.
RESUME_MAY_CHANGE = {"train_data_dir", "test_data_dir", "gradient_steps", "log_interval", "save_interval",
                     "workers", "device_ids", "amp", "compile", "checkpoint_activations", "channels_last",
                     "resume"}
TEST_SCENES = 32      # the fixed test batch: test ELBO (spread over ranks), and the first IMAGE_SCENES as images
IMAGE_SCENES = 8
TEST_CONTEXT = 3      # context views per test scene, as torch-gqn's test batch
DIST_TIMEOUT = datetime.timedelta(minutes=10)  # a rank that stops answering ends the job after this


def str2bool(s):
    low = str(s).strip().lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {s!r}")


def positive_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return n


def nonneg_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    return n


def build_parser():
    p = argparse.ArgumentParser(description="Train a Generative Query Network (Eslami et al. 2018).",
                                allow_abbrev=False)
    # Every default is None: the preset fills what is not given, and --resume can tell what was given.
    a = p.add_argument
    a("--train_data_dir", help="training split folder (converted shards or torch-gqn N.pt[.gz] files); "
                               "omit both data folders for the default job on the built-in data set")
    a("--test_data_dir", help="test split folder (fixed test batch: test ELBO and image grids)")
    a("--dataset", help="Room, Jaco, Labyrinth, Shepard-Metzler or a DeepMind name (default: what the data records)")
    a("--min_context", type=positive_int, help="fewest context views per training scene (default: 1)")
    a("--max_context", type=positive_int, help="most context views per training scene (default: K, the data set's)")
    a("--gradient_steps", type=positive_int, help="number of gradient steps (paper: 2M)")
    a("--batch_size", type=positive_int, help="scenes per step, global over all devices and ranks (paper: 36)")
    a("--root_log_dir", help="root of run folders (default: runs)")
    a("--log_dir", help="run folder name under --root_log_dir (default: default)")
    a("--log_interval", type=positive_int, help="steps between logs (TensorBoard, log line)")
    a("--save_interval", type=positive_int, help="steps between checkpoints (latest.pt and step_N.pt)")
    a("--workers", type=nonneg_int, help="data loading processes (0 = in the training process)")
    a("--device_ids", type=nonneg_int, nargs="+", help="CUDA devices; more than one: nn.DataParallel (default: 0)")
    a("--representation", choices=["pool", "tower", "pyramid", "volume"],
      help="representation network: the paper's pool, tower or pyramid, or volume (volume.py: the context read "
           "along the query camera's rays) (default: pool)")
    a("--layers", type=positive_int, help="L, the number of generation steps (default: 12)")
    a("--shared_core", type=str2bool, help="share the cores' weights across the L steps: True/False (default False)")
    a("--seed", type=nonneg_int, help="random seed (default: drawn, and recorded)")
    a("--resume", type=str2bool, nargs="?", const=True, help="continue the run in <root_log_dir>/<log_dir>")
    a("--preset", choices=sorted(PRESETS), help="paper (default with data folders) or cpu (default without)")
    a("--amp", choices=["none", "bf16"], help="mixed precision: bf16 autocast (default: none)")
    a("--compile", type=str2bool, nargs="?", const=True, help="torch.compile the model (default: False)")
    a("--checkpoint_activations", type=str2bool, nargs="?", const=True,
      help="recompute activations in the backward pass to save memory (default: False)")
    a("--channels_last", type=str2bool, nargs="?", const=True,
      help="channels_last (NHWC) memory format for weights and activations; same function; meant for GPUs, "
           "no faster on the CPU (default: False)")
    a("--grad_clip", type=float, help="clip the gradient norm to this (default: 0 = off)")
    for name in ("r_dim", "h_dim", "z_dim", "u_dim", "image_size"):
        a(f"--{name}", type=positive_int, help=f"model {name} (preset's by default)")
    a("--fov", type=float, help="volume: the cameras' field of view in degrees (default: 20, Shepard-Metzler)")
    a("--near", type=float, help="volume: nearest depth sampled along the query rays (default: 2.7)")
    a("--far", type=float, help="volume: farthest depth sampled along the query rays (default: 3.97)")

    def error(message):  # argparse's usage block + exit 2 -> the project's one line + exit 1
        raise UserError(message)

    p.error = error
    return p


def parse_args(argv=None):
    """Command line -> (Config with preset and flags applied, dict of the flags given explicitly)."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "device_ids" in given:
        given["device_ids"] = list(given["device_ids"])
    if "grad_clip" in given and not (math.isfinite(given["grad_clip"]) and given["grad_clip"] >= 0):
        raise UserError(f"--grad_clip must be a non-negative number, got {given['grad_clip']}")
    has_data = bool(given.get("train_data_dir") or given.get("test_data_dir"))
    preset = given.get("preset", "paper" if has_data or given.get("resume") else "cpu")
    cfg = Config(**{**PRESETS[preset], "preset": preset})
    cfg = dataclasses.replace(cfg, **given)
    return cfg, given


def check_config(cfg, world_size):
    if cfg.batch_size % world_size:
        raise UserError(f"--batch_size {cfg.batch_size} does not split evenly over {world_size} processes")
    if cfg.image_size % 4:
        raise UserError(f"--image_size {cfg.image_size}: must be a multiple of 4 (the canvas is 4x the state)")
    if not (math.isfinite(cfg.fov) and 0 < cfg.fov < 180):
        raise UserError(f"--fov {cfg.fov}: must be between 0 and 180 degrees")
    if not (math.isfinite(cfg.far) and 0 < cfg.near < cfg.far):
        raise UserError(f"--near {cfg.near} and --far {cfg.far}: need 0 < near < far")
    if cfg.max_context and cfg.min_context > cfg.max_context:
        raise UserError(f"--min_context {cfg.min_context} is more than --max_context {cfg.max_context}")
    if bool(cfg.train_data_dir) != bool(cfg.test_data_dir):
        missing = "--test_data_dir" if cfg.train_data_dir else "--train_data_dir"
        raise UserError(f"{missing} is missing: give both data folders, or neither for the default job")


# ------------------------------------------------------------------------------------------------ data

def resolve_dataset(name, train, test, cfg):
    """--dataset and the data's own name -> (DeepMind or torch-gqn name, K = the maximum context size)."""
    from gqn_dataset import MAX_CONTEXT

    if train.dataset and test.dataset and train.dataset != test.dataset:
        raise UserError(f"--test_data_dir {cfg.test_data_dir} holds {test.dataset} but --train_data_dir "
                        f"{cfg.train_data_dir} holds {train.dataset}")
    if train.image_size != test.image_size:
        raise UserError(f"--test_data_dir {cfg.test_data_dir} has {test.image_size}x{test.image_size} images but "
                        f"--train_data_dir {cfg.train_data_dir} has {train.image_size}x{train.image_size}")
    recorded = train.dataset or test.dataset
    known = ", ".join(["Room", "Jaco", "Labyrinth", "Shepard-Metzler"] + sorted(MAX_CONTEXT))
    if not name:
        if not recorded:
            raise UserError(f"--dataset is needed: {cfg.train_data_dir} does not record which data set it holds "
                            f"(pass one of {known})")
        name = recorded
    family = TORCH_GQN_NAMES.get(name.lower()) or ((name,) if name in MAX_CONTEXT else None)
    if family is None and re.fullmatch(r"shepard_metzler_\d+_parts", name):  # the renderer's other sizes
        family = (name,)
    if family is None:
        raise UserError(f"--dataset {name}: unknown (one of {known})")
    if recorded and recorded not in family and not (name.lower() == "shepard-metzler" and
                                                    re.fullmatch(r"shepard_metzler_\d+_parts", recorded)):
        raise UserError(f"--dataset {name} does not match the data: {cfg.train_data_dir} holds {recorded}")
    return (recorded or name), MAX_CONTEXT.get(family[0], MAX_CONTEXT["shepard_metzler_5_parts"])


def builtin_data(local_master, barrier):
    """The default job's data: render the built-in Shepard-Metzler set into data/ once; its split folders."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dataset"))
    from shepard_metzler import dataset_name, render_dataset

    name = dataset_name(BUILTIN_DATA["parts"])
    out = os.path.join("data", name)
    splits = os.path.join(out, "train"), os.path.join(out, "test")

    def present():
        return all(os.path.isdir(s) and any(f.endswith(".pt") for f in os.listdir(s)) for s in splits)

    if local_master:
        if present():
            print(f"Using the built-in data set in {out}/ (rendered before).")
        else:
            n, m = BUILTIN_DATA["train_scenes"], BUILTIN_DATA["test_scenes"]
            print(f"Rendering the built-in data set once: {n} + {m} Shepard-Metzler scenes of "
                  f"{BUILTIN_DATA['parts']} cubes, 15 views each, into {out}/ (about a minute on 2 cores).")
            # Rendered into a side folder and renamed: a run killed half-way never leaves half a data set.
            partial = out + ".partial"
            shutil.rmtree(partial, ignore_errors=True)
            render_dataset(partial, n, m, parts=BUILTIN_DATA["parts"], seed=BUILTIN_DATA["seed"],
                           workers=BUILTIN_DATA["workers"])
            if os.path.exists(out):  # an empty or half-filled folder from elsewhere: set aside, not deleted
                os.replace(out, out + f".old-{int(time.time())}")
            os.replace(partial, out)
    barrier()
    return splits


class Views:
    """A fixed test batch: for scenes `ids`, TEST_CONTEXT fixed context views and one query view (fixed_views)."""

    def __init__(self, ds, ids, seed, max_context):
        from gqn_dataset import fixed_views

        xs, vs, xqs, vqs = [], [], [], []
        for i in ids:
            ctx, q = fixed_views(seed, i, ds.views, min(TEST_CONTEXT, max_context))
            frames, cameras = ds.load(i, ctx.tolist() + [q])
            xs.append(frames[:-1]), vs.append(cameras[:-1]), xqs.append(frames[-1]), vqs.append(cameras[-1])
        self.x, self.v = torch.stack(xs), torch.stack(vs)      # (T, K, 3, H, W) uint8, (T, K, 7)
        self.x_q, self.v_q = torch.stack(xqs), torch.stack(vqs)  # (T, 3, H, W) uint8, (T, 7)

    def first(self, n):
        out = object.__new__(Views)
        out.x, out.v, out.x_q, out.v_q = self.x[:n], self.v[:n], self.x_q[:n], self.v_q[:n]
        return out


def to_model(images, size, device):
    """uint8 (..., 3, H, W) -> float in [0, 1] at the model's size (area interpolation when the sizes differ)."""
    x = images.to(device, non_blocking=True).float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        lead = x.shape[:-3]
        x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="area").reshape(*lead, 3, size, size)
    return x


# ------------------------------------------------------------------------------------------------ distributed

class Dist:
    """torchrun's environment, or a single process. Rank-0-only work is gated on `master`."""

    def __init__(self):
        self.on = "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) >= 1 \
            and "LOCAL_RANK" in os.environ
        self.rank = int(os.environ["RANK"]) if self.on else 0
        self.world_size = int(os.environ["WORLD_SIZE"]) if self.on else 1
        self.local_rank = int(os.environ["LOCAL_RANK"]) if self.on else 0
        self.master = self.rank == 0
        self.started = False

    def start(self):
        if not self.on:
            return
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=DIST_TIMEOUT)
        # For the end of the run only: the other ranks wait there while rank 0 scores the whole test split, which
        # may outlast DIST_TIMEOUT; a rank that dies meanwhile still ends the job (torchrun stops every rank).
        self.end_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        self.started = True

    def stop(self):
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def barrier(self):
        if self.started:
            import torch.distributed as dist

            dist.barrier()

    def finish(self):
        """Every rank waits for rank 0's end-of-run work, so that no rank tears its process group down while
        another still holds connections to it (a rank leaving early could abort in gloo's teardown)."""
        if self.started:
            import torch.distributed as dist

            dist.barrier(group=self.end_group)

    def first_error(self, message):
        """Every rank's error message (or None) -> the first one, on every rank: all ranks stop together."""
        if not self.started:
            return message
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, message)
        for rank, m in enumerate(out):
            if m is not None:
                return m if rank == 0 else f"rank {rank}: {m}"
        return None

    def broadcast(self, obj):
        if not self.started:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, t):
        """Sum over ranks, in place."""
        if self.started:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t


def agreed(dist, fn):
    """Run fn() on every rank; if any rank raises UserError/DatasetError, every rank raises the first."""
    from gqn_dataset import DatasetError

    try:
        result, message = fn(), None
    except (UserError, DatasetError) as e:  # a data folder that cannot serve is the user's to fix
        result, message = None, str(e)
    message = dist.first_error(message)
    if message is not None:
        raise UserError(message)
    return result


# ------------------------------------------------------------------------------------------------ logging

def image_grid(images, nrow=8, pad=2):
    """(N, 3, H, W) in [0, 1] -> (3, rows*(H+pad)+pad, nrow*(W+pad)+pad) on white, for TensorBoard."""
    n, c, h, w = images.shape
    nrow = min(nrow, n)
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def nll_floor(sigma, dims):
    """The Gaussian NLL's constant part, dims * (log sigma + log(2 pi) / 2): 6909 nats at sigma 0.7, 64x64x3."""
    return dims * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


def bits_per_dim(nats, dims):
    """Negative ELBO in nats per image -> bits per dimension of the 8-bit image (+8: 256 bins of width 1/256)."""
    return nats / (dims * math.log(2)) + 8.0


def cpu_has_bf16():
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 bf16 or AMX); True when torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # private in torch 2.13: guard against its loss
    except (AttributeError, RuntimeError):
        return True


def save_samples(path, views, generated, size):
    """PNG: per scene, the context views, the ground truth query view and the generated one, side by side."""
    from PIL import Image, ImageDraw

    ctx = to_model(views.x, size, "cpu")          # (N, K, 3, s, s)
    truth = to_model(views.x_q, size, "cpu")      # (N, 3, s, s)
    n, k = ctx.shape[:2]
    pad, head, scale = 4, 14, max(1, 96 // size)
    tile = size * scale
    cols = k + 2
    canvas = Image.new("RGB", (cols * (tile + pad) + 2 * pad, head + n * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in [(0, "context views"), (k, "ground truth"), (k + 1, "generated")]:
        draw.text((pad + j * (tile + pad) + (pad if j >= k else 0), 1), label, fill="black")
    for i in range(n):
        row = [ctx[i, j] for j in range(k)] + [truth[i], generated[i].float().cpu().clamp(0, 1)]
        for j, img in enumerate(row):
            arr = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            im = Image.fromarray(arr).resize((tile, tile), Image.NEAREST)
            canvas.paste(im, (pad + j * (tile + pad) + (pad if j >= k else 0), head + i * (tile + pad)))
    import io

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ training

def run_dir_of(cfg):
    return os.path.join(cfg.root_log_dir, cfg.log_dir)


def prepare_run(cfg, given, dist):
    """Rank 0: a fresh run folder, or the checkpoint to resume (broadcast to every rank) -> (cfg, ckpt or None)."""
    def master_side():
        run_dir = run_dir_of(cfg)
        _, latest, _ = checkpoint_paths(run_dir)
        if not cfg.resume:
            if os.path.exists(latest):
                raise UserError(f"--log_dir {run_dir} already holds a run (checkpoints/latest.pt): pass --resume "
                                f"to continue it, or another --log_dir")
            return None
        if not os.path.exists(latest):
            raise UserError(f"--resume: {latest} does not exist (no run to continue in {run_dir})")
        try:
            return load_checkpoint(latest)
        except CheckpointError as e:
            raise UserError(f"--resume: {e}") from None

    ckpt = dist.broadcast(agreed(dist, master_side) if dist.master else agreed(dist, lambda: None))
    if ckpt is None:
        return cfg, None
    saved = Config(**{k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__})
    saved.adam_betas = tuple(saved.adam_betas)
    changed = [k for k, v in given.items() if k not in RESUME_MAY_CHANGE and k not in ("root_log_dir", "log_dir")
               and v != getattr(saved, k)]
    if changed:
        k = changed[0]
        raise UserError(f"--{k} {given[k]} differs from the run being resumed ({getattr(saved, k)}); "
                        f"only {', '.join('--' + n for n in sorted(RESUME_MAY_CHANGE - {'resume'}))} may change")
    keep = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE - {"resume"}}
    return dataclasses.replace(saved, **keep, root_log_dir=cfg.root_log_dir, log_dir=cfg.log_dir, resume=True), ckpt


def pick_device(cfg, dist):
    if dist.on:
        return torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    bad = [i for i in cfg.device_ids if i >= n]
    if bad:
        raise UserError(f"--device_ids {bad[0]}: this machine has {n} CUDA device(s)")
    return torch.device(f"cuda:{cfg.device_ids[0]}")


def train(cfg, given):
    dist = Dist()
    dist.start()
    try:
        _train(cfg, given, dist)
    finally:
        dist.stop()


def _train(cfg, given, dist):
    from gqn_dataset import TrainBatches, open_split
    from model import GQN

    master = dist.master
    log = print if master else (lambda *a, **k: None)
    default_job = not cfg.train_data_dir and not cfg.test_data_dir and not cfg.resume

    if dist.on:  # torchrun stops the surviving ranks with SIGTERM when one fails: say so instead of vanishing
        def on_sigterm(signum, frame):
            if master:  # os.write: the handler may interrupt a print (tqdm's) on the same buffered stream
                os.write(2, f"\nerror: rank 0 stopped by SIGTERM (torchrun stops every rank when one fails or the job "
                            f"is interrupted: see its summary); checkpoints in "
                            f"{checkpoint_paths(run_dir_of(cfg))[0]} are kept\n".encode())
            os._exit(143)  # no clean-up that could wait on the dead rank

        signal.signal(signal.SIGTERM, on_sigterm)
    cfg, ckpt = prepare_run(cfg, given, dist)
    agreed(dist, lambda: check_config(cfg, dist.world_size))
    if cfg.seed < 0:
        cfg.seed = dist.broadcast(secrets.randbelow(2**31))
    if default_job:
        log(f"No data folders given: the default job. It trains the '{cfg.preset}' preset, a small GQN for a 2-core "
            f"CPU (L={cfg.layers}, {cfg.image_size}x{cfg.image_size} images, {cfg.gradient_steps} steps of "
            f"{cfg.batch_size} scenes), on the built-in Shepard-Metzler set, into {run_dir_of(cfg)}/. Pass "
            f"--train_data_dir and --test_data_dir for the paper's configuration.")
        cfg.train_data_dir, cfg.test_data_dir = builtin_data(dist.local_rank == 0, dist.barrier)

    def open_data():
        train_ds = open_split(cfg.train_data_dir, "--train_data_dir")
        test_ds = open_split(cfg.test_data_dir, "--test_data_dir")
        return train_ds, test_ds, resolve_dataset(cfg.dataset, train_ds, test_ds, cfg)

    train_ds, test_ds, (dataset, max_context) = agreed(dist, open_data)
    cfg.dataset = dataset  # resolved, so config.json and the checkpoints say what was trained on
    device = agreed(dist, lambda: pick_device(cfg, dist))

    run_dir = run_dir_of(cfg)
    ckpt_dir, latest, _ = checkpoint_paths(run_dir)
    if master:
        os.makedirs(ckpt_dir, exist_ok=True)
        resolved = dataclasses.asdict(cfg)
        print(f"config ({'resumed from ' + latest if ckpt else run_dir}):")
        print(textwrap.fill("  ".join(f"{k}={v}" for k, v in resolved.items()), 118, initial_indent="  ",
                            subsequent_indent="  ", break_on_hyphens=False))
        atomic_write(os.path.join(run_dir, "config.json"), (json.dumps(resolved, indent=2) + "\n").encode())

    # Model, optimiser; `model` stays the raw module whatever wraps it (DataParallel, DDP, compile).
    torch.manual_seed(cfg.seed)
    model = GQN(representation=cfg.representation, L=cfg.layers, shared_core=cfg.shared_core, r_dim=cfg.r_dim,
                h_dim=cfg.h_dim, z_dim=cfg.z_dim, u_dim=cfg.u_dim, image_size=cfg.image_size,
                checkpoint_activations=cfg.checkpoint_activations, fov=cfg.fov, near=cfg.near, far=cfg.far)
    # fused: one kernel for all parameters instead of a loop of small ops (the paper model's step: 390 -> 50 ms on CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr_i, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                 fused=True)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
    model.to(device)
    if cfg.channels_last:
        # in place (param.data), so the optimiser keeps the same parameters
        model.to(memory_format=torch.channels_last)
    # Adam's state follows its parameter's device and memory format (it was loaded on the CPU, contiguous).
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = torch.empty_like(p).copy_(v) if v.shape == p.shape else v.to(device)
    wrapped = model
    if dist.started:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif device.type == "cuda" and len(cfg.device_ids) > 1:
        if cfg.compile:
            raise UserError("--compile works on one device or under torchrun (DDP), not with nn.DataParallel "
                            "(--device_ids with several ids)")
        wrapped = torch.nn.DataParallel(model, device_ids=cfg.device_ids)
    elif len(cfg.device_ids) > 1 and "device_ids" in given:
        log("note: no CUDA device, so --device_ids is ignored and training runs on the CPU")
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"GQN: {n_params / 1e6:.2f}M parameters, representation {cfg.representation}, L={cfg.layers}; "
        f"data {dataset} ({len(train_ds)} train / {len(test_ds)} test scenes, {train_ds.image_size}px"
        f"{'' if train_ds.image_size == cfg.image_size else f' resized to {cfg.image_size}px'}, K={max_context}, "
        f"{cfg.min_context}-{min(cfg.max_context or max_context, train_ds.views - 1)} context views a scene); "
        f"device {device}{f' x {dist.world_size} processes' if dist.started else ''}")

    def make_ckpt(step):
        return {"model": model.state_dict(), "model_config": dict(model.config), "optimizer": optimizer.state_dict(),
                "step": int(step), "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
                "data": {"dataset": dataset, "image_size": int(train_ds.image_size), "max_context": int(max_context)},
                "rng": rng_state()}

    saved = [start]  # the step latest.pt holds

    def save(step, numbered):
        if master:
            paths = [latest] + ([checkpoint_paths(run_dir, step)[2]] if numbered else [])
            save_checkpoint(make_ckpt(step), paths)
        saved[0] = step

    if ckpt is None:
        save(0, False)  # from here on a loadable latest.pt exists, whenever the run is killed
    total = cfg.gradient_steps
    if start >= total:
        log(f"{latest} is at step {start}, --gradient_steps is {total}: nothing to do")
        return

    # The fixed test batch, the same for every run with this seed; ranks split its test ELBO between them.
    t = min(TEST_SCENES, len(test_ds))
    test_ids = np.linspace(0, len(test_ds) - 1, t).round().astype(int).tolist()
    test = Views(test_ds, test_ids, cfg.seed, max_context)
    test_eps = torch.randn((t, *model.noise_shape), generator=torch.Generator().manual_seed(cfg.seed))
    dims = 3 * cfg.image_size * cfg.image_size

    writer = None
    if master:
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard drops what an interrupted run logged after the checkpoint it resumed from.
        writer = SummaryWriter(logdir=run_dir, purge_step=start + 1 if start > 0 else None)

    batches = TrainBatches(train_ds, cfg.batch_size, cfg.max_context or max_context, cfg.seed,
                           noise_shape=model.noise_shape, rank=dist.rank, world_size=dist.world_size,
                           min_context=cfg.min_context)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, total),
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda")
    # bf16 autocast (or nothing), built once; the loss itself is always taken in float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext()
    if cfg.amp == "bf16" and device.type == "cpu" and master and not cpu_has_bf16():
        # without AVX-512 bf16 / AMX instructions the CPU emulates bf16: slower than float32, not faster
        print("note: this CPU has no bf16 instructions; --amp bf16 will be slower than --amp none here")

    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not master, dynamic_ncols=True)
    acc = torch.zeros(3, dtype=torch.float64)  # interval sums of ELBO, KL, NLL over all scenes of all ranks
    n_acc, t0, last_step = 0, time.perf_counter(), start
    step = start
    model.train()
    try:
        for step, batch in enumerate(loader, start):
            lr = learning_rate(step, cfg.lr_i, cfg.lr_f, cfg.lr_n)
            sigma = pixel_sigma(step, cfg.sigma_i, cfg.sigma_f, cfg.sigma_n)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = to_model(batch["x"], cfg.image_size, device)        # (b, K, 3, s, s)
            x_q = to_model(batch["x_q"], cfg.image_size, device)    # (b, 3, s, s)
            if cfg.channels_last:
                x_q = x_q.contiguous(memory_format=torch.channels_last)
            v, v_q = batch["v"].to(device), batch["v_q"].to(device)
            mask, eps = batch["mask"].to(device), batch["eps"].to(device)

            with autocast:
                # A compiled graph would specialise on a Python float and recompile for every new sigma.
                out = wrapped(x, v, v_q, x_q, torch.tensor(sigma, device=device) if cfg.compile else sigma,
                              mask=mask, eps=eps)
            elbo = out.elbo.float()
            # The mean over this rank's b = B/W scenes: DDP averages gradients over the W ranks, which makes the
            # gradient of the mean over all B scenes, as one process computes it.
            loss = -elbo.mean()
            stats = dist.all_reduce(torch.stack([elbo.sum(), out.kl.float().sum(), out.nll.float().sum()])
                                    .detach().double())
            values = stats.cpu()
            if not torch.isfinite(values).all():  # same verdict on every rank: all stop before any update
                raise NonFiniteLoss(f"step {step}: the loss is not finite (ELBO {values[0] / cfg.batch_size:.4g}, "
                                    f"KL {values[1] / cfg.batch_size:.4g}, NLL {values[2] / cfg.batch_size:.4g})")
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            acc += values
            n_acc += cfg.batch_size
            bar.update(1)
            if master:
                bar.set_postfix(loss=f"{-values[0].item() / cfg.batch_size:.1f}", refresh=False)
            if done % cfg.log_interval == 0 or done == total:
                elapsed = time.perf_counter() - t0
                log_metrics(cfg, writer, bar, model, test, test_eps, dist, device, done, acc / n_acc,
                            elapsed / (done - last_step), n_acc / elapsed, sigma, lr, dims, autocast)
                acc.zero_()
                n_acc, t0, last_step = 0, time.perf_counter(), done
            if done % cfg.save_interval == 0 or done == total:
                save(done, done % cfg.save_interval == 0)
    except NonFiniteLoss as e:
        bar.close()
        raise UserError(f"{e}; stopped without updating the weights. The last good checkpoint is kept: {latest} "
                        f"(step {saved[0]})") from None
    except Exception as e:
        if dist.started and is_comm_error(e):
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip() or type(e).__name__).splitlines()[0])[:160]
            raise UserError(f"rank {dist.rank}: lost contact with the other processes (a rank died or the network "
                            f"failed: {first}); checkpoints up to {latest} are kept") from None
        raise
    bar.close()

    if master:
        model.eval()
        n = min(IMAGE_SCENES, t)
        with torch.no_grad(), autocast:
            generated = model.generate(to_model(test.x[:n], cfg.image_size, device), test.v[:n].to(device),
                                       test.v_q[:n].to(device),
                                       generator=torch.Generator(device).manual_seed(cfg.seed))
        samples = os.path.join(run_dir, "samples.png")
        save_samples(samples, test.first(n), generated, cfg.image_size)
        # The whole test split scored as evaluate.py does, with novel-view renderings, into TensorBoard (eval/*).
        import evaluate

        r = evaluate.end_of_training(writer, total, model, train_ds, test_ds, min(TEST_CONTEXT, max_context),
                                     cfg.seed, device, cfg.image_size)
        log(f"Test split ({r['scenes']} scenes, {r['context']} context views): RMSE {r['rmse']:.2f} vs "
            f"{r['mean_image_rmse']:.2f} for the mean training image (ratio {r['rmse_ratio']:.3f}), MAE {r['mae']:.2f}")
        writer.close()
        log(f"Done: {total} steps. Checkpoint {latest}; TensorBoard: tensorboard --logdir {run_dir}; "
            f"ground truth next to generated views: {samples}")
    dist.finish()


def is_comm_error(e):
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in ("gloo", "nccl", "connection", "peer", "timed out"))


@torch.no_grad()
def log_metrics(cfg, writer, bar, model, test, test_eps, dist, device, step, means, ms_step, scenes_s, sigma, lr,
                dims, autocast):
    """Test ELBO on the fixed test batch (spread over ranks), then, on rank 0, TensorBoard and one log line."""
    model.eval()
    mine = list(range(dist.rank, len(test_eps), dist.world_size))  # this rank's share of the test batch
    test_sums = torch.zeros(3, dtype=torch.float64, device=device)
    if mine:
        idx = torch.tensor(mine)
        with autocast:
            out = model(to_model(test.x[idx], cfg.image_size, device), test.v[idx].to(device),
                        test.v_q[idx].to(device), to_model(test.x_q[idx], cfg.image_size, device), sigma,
                        eps=test_eps[idx].to(device))
        test_sums = torch.stack([out.elbo.sum(), out.kl.sum(), out.nll.sum()]).double()
    test_means = (dist.all_reduce(test_sums) / len(test_eps)).cpu()
    if writer is not None:
        elbo, kl, nll = means.tolist()
        floor = nll_floor(sigma, dims)
        for split, (e, k, n) in (("train", (elbo, kl, nll)), ("test", test_means.tolist())):
            writer.add_scalar(f"{split}/elbo", e, step)
            writer.add_scalar(f"{split}/kl", k, step)
            writer.add_scalar(f"{split}/nll", n, step)
            writer.add_scalar(f"{split}/bits_per_dim", bits_per_dim(-e, dims), step)
            writer.add_scalar(f"{split}/nll_minus_sigma_floor", n - floor, step)
        writer.add_scalar("schedule/sigma", sigma, step)
        writer.add_scalar("schedule/lr", lr, step)
        writer.add_scalar("speed/scenes_per_s", scenes_s, step)
        writer.add_scalar("speed/ms_per_step", 1000 * ms_step, step)
        # Images: the first scenes of the test batch; noise from fixed seeds so the grids differ only by training.
        n = min(IMAGE_SCENES, len(test_eps))
        x, v, v_q = to_model(test.x[:n], cfg.image_size, device), test.v[:n].to(device), test.v_q[:n].to(device)
        x_q = to_model(test.x_q[:n], cfg.image_size, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
            torch.manual_seed(cfg.seed)
            rec = model.reconstruct(x, v, v_q, x_q)
            gen = model.generate(x, v, v_q, generator=torch.Generator(device).manual_seed(cfg.seed))
        for tag, img in (("ground_truth", x_q), ("reconstruction", rec), ("generation", gen)):
            writer.add_image(f"test/{tag}", image_grid(img.float().clamp(0, 1).cpu()), step)
        writer.flush()
        bar.write(f"step {step:>7d} | ELBO {elbo:9.1f} KL {kl:7.2f} NLL {nll:9.1f} (sigma floor {floor:7.1f}) | "
                  f"test ELBO {test_means[0]:9.1f} | {bits_per_dim(-elbo, dims):.3f} bits/dim | sigma {sigma:.3f} "
                  f"lr {lr:.2e} | {1000 * ms_step:6.0f} ms/step {scenes_s:6.1f} scenes/s")
    model.train()


# ------------------------------------------------------------------------------------------------ entry point

def main(argv=None):
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cfg, given = parse_args(argv)
        train(cfg, given)
    except UserError as e:
        if rank0:  # every rank agrees on the error (Dist.first_error); one of them says it
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if rank0:
            print("\ninterrupted: checkpoints/latest.pt holds the last saved step; continue with --resume",
                  file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
