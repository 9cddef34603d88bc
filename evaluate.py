"""Evaluate a trained GQN over a whole test split (Eslami et al. 2018).

Reports what the paper trains for, the negative ELBO (eq. S9's terms: KL and the Gaussian NLL of the query
image, in nats per image at the final pixel sigma of 0.7), and what it is judged by, the quality of the
generated query view: the image predicted for v_q with z drawn from the prior (figure S2's generation
core), taken as the observation mean clamped to [0, 1], compared with the true x_q on the 0-255 scale.
MAE is the mean absolute error over all pixels; RMSE is the per-image RMSE averaged over images, as in
ViewFormer's and STR-GQN's tables. With --train_data_dir it also scores the trivial baseline that predicts
the mean training image for every query.

Views are deterministic (gqn_dataset.fixed_views): each scene gets the same K context views and query view
for a given --seed, and the ELBO's posterior noise is a function of (seed, scene) alone. The prior samples
of the generated views are drawn per batch from a seeded generator, so the image scores repeat exactly for
the same --seed and --batch_size.

Images stored at another size than the model's are resized with area interpolation only when that is what
training did (the checkpoint records the stored size it trained on); any other size mismatch is an error.

    python evaluate.py --checkpoint runs/default/checkpoints/latest.pt --test_data_dir data/shepard_metzler_5_parts/test
    python evaluate.py --checkpoint C --test_data_dir D --train_data_dir T --context 3 --json results.json
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gqn_dataset import DatasetError, open_split

SIGMA = 0.7  # the final pixel sigma of the paper's annealing schedule: the likelihood the scores refer to


class UserError(Exception):
    """Bad input from the user: printed as one `error: ...` line by main(), exit status 1."""


# ----------------------------------------------------------------------------- metrics

def image_errors(pred, target):
    """Per-image MAE and RMSE of pred against target, both float (B, C, H, W) on the 0-255 scale -> (B,), (B,)."""
    diff = (pred.double() - target.double()).flatten(1)
    return diff.abs().mean(1), diff.pow(2).mean(1).sqrt()


def bits_per_dim(nats_per_image, dims):
    """Negative ELBO in nats per image -> bits per dimension of the 8-bit image.

    The Gaussian is a density on [0, 1]^D; discretised into 256 bins of width 1/256 its probabilities are
    the density times 256^-D, hence the 8 extra bits per dimension (the usual convention for image models).
    """
    return nats_per_image / (dims * math.log(2)) + 8.0


def resize(x, size):
    """uint8/float images (..., C, H, W) -> float (..., C, size, size); area interpolation as training does."""
    x = x.float()
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    lead = x.shape[:-3]
    x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="area")
    return x.reshape(*lead, *x.shape[-3:])


# ----------------------------------------------------------------------------- checkpoint and data

def load_model(path, device="cpu"):
    """Rebuild the GQN a checkpoint holds -> (model in eval mode on device, checkpoint dict)."""
    from checkpoint import CheckpointError, build_model, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
        model = build_model(ckpt)
    except CheckpointError as e:
        raise UserError(f"--checkpoint {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:  # model_config or weights from another version
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--checkpoint {path}: weights do not fit its model_config ({first})") from None
    return model.to(device).eval(), ckpt


def input_size(ckpt, ds, folder, flag):
    """Check that the checkpoint's model can read this data; the model's image size (data resized to it)."""
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


class QueryViews(torch.utils.data.Dataset):
    """Scene i -> its fixed K context views and query view: x (K,3,H,W) uint8, v (K,7), x_q (3,H,W), v_q (7,)."""

    def __init__(self, ds, context, seed, scenes=None):
        self.ds, self.context, self.seed = ds, context, seed
        self.scenes = range(len(ds)) if scenes is None else scenes

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, k):
        from gqn_dataset import fixed_views

        i = int(self.scenes[k])
        ctx, q = fixed_views(self.seed, i, self.ds.views, self.context)
        frames, cameras = self.ds.load(i, [int(j) for j in ctx] + [int(q)])
        return frames[:-1], cameras[:-1], frames[-1], cameras[-1], i


def posterior_noise(noise_shape, seed, scenes):
    """eps for the ELBO's posterior sample: a function of (seed, scene) only, so batching does not change it."""
    g = torch.Generator()
    out = []
    for s in scenes.tolist():
        g.manual_seed(seed * 1_000_003 + s)
        out.append(torch.randn(noise_shape, generator=g))
    return torch.stack(out)


@torch.no_grad()
def mean_image(ds, size, max_scenes=2000, workers=0, progress=True):
    """Mean training image (3, size, size) on the 0-255 scale, over every view of up to max_scenes scenes.

    The scenes are spread evenly over the split (all of them when max_scenes is 0 or larger than the split).
    """
    n = len(ds)
    idx = list(range(n)) if max_scenes <= 0 or max_scenes >= n else \
        sorted(set(np.linspace(0, n - 1, max_scenes).round().astype(int).tolist()))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=None, num_workers=workers)
    total, count = torch.zeros(3, size, size, dtype=torch.float64), 0
    for frames, _ in tqdm(loader, desc="mean image", unit="scene", disable=not progress, leave=False):
        total += resize(frames, size).double().sum(0)
        count += frames.shape[0]
    return (total / count).float()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, ds, context=3, seed=0, batch_size=32, device="cpu", size=None, baseline=None,
             workers=0, progress=True, max_scenes=0):
    """Score model on every scene of ds (the first max_scenes if > 0) -> dict of means (module docstring).

    baseline: optional mean training image (3, H, W) on the 0-255 scale, scored on the same query views.
    """
    if not 1 <= context <= ds.views - 1:
        raise UserError(f"--context {context}: must be between 1 and {ds.views - 1} "
                        f"(the data has {ds.views} views per scene and one is the query)")
    size = size or model.config["image_size"]
    scenes = range(min(max_scenes, len(ds)) if max_scenes > 0 else len(ds))
    loader = torch.utils.data.DataLoader(QueryViews(ds, context, seed, scenes), batch_size=batch_size,
                                         num_workers=workers)
    g = torch.Generator(device=device)
    sums = {k: 0.0 for k in ("elbo", "kl", "nll", "mae", "rmse", "base_mae", "base_rmse")}
    n = 0
    for batch, (x, v, x_q, v_q, scenes) in enumerate(tqdm(loader, desc="evaluate", unit="batch",
                                                           disable=not progress)):
        x = (resize(x, size) / 255).to(device)  # (B, K, 3, H, W) in [0, 1]
        x_q255 = resize(x_q, size)  # (B, 3, H, W) on 0-255
        v, v_q = v.to(device), v_q.to(device)
        eps = posterior_noise(model.noise_shape, seed, scenes).to(device)
        out = model(x, v, v_q, (x_q255 / 255).to(device), SIGMA, eps=eps)
        g.manual_seed(seed * 1_000_003 + batch)
        pred = model.generate(x, v, v_q, generator=g).clamp(0, 1).cpu() * 255
        mae, rmse = image_errors(pred, x_q255)
        sums["elbo"] += out.elbo.double().sum().item()
        sums["kl"] += out.kl.double().sum().item()
        sums["nll"] += out.nll.double().sum().item()
        sums["mae"] += mae.sum().item()
        sums["rmse"] += rmse.sum().item()
        if baseline is not None:
            mae, rmse = image_errors(baseline.expand_as(x_q255), x_q255)
            sums["base_mae"] += mae.sum().item()
            sums["base_rmse"] += rmse.sum().item()
        n += x.shape[0]
    m = {k: s / n for k, s in sums.items()}
    result = {
        "scenes": n, "context": context, "seed": seed, "sigma": SIGMA, "image_size": size,
        "elbo": m["elbo"], "kl": m["kl"], "nll": m["nll"],
        "bits_per_dim": bits_per_dim(-m["elbo"], 3 * size * size),
        "mae": m["mae"], "rmse": m["rmse"],
    }
    if baseline is not None:
        result.update(mean_image_mae=m["base_mae"], mean_image_rmse=m["base_rmse"],
                      rmse_ratio=m["rmse"] / m["base_rmse"] if m["base_rmse"] > 0 else float("nan"))
    return result


def end_of_training(writer, step, model, train_ds, test_ds, context=3, seed=0, device="cpu", size=None,
                    image_scenes=2, baseline_scenes=500, progress=True):
    """What train.py logs when a run ends: this file's scores over the whole test split and render.py's views.

    Scalars eval/<metric> and images eval/novel_views/scene_<i> (context, a ring of new viewpoints, the
    scene's other views beside their truth) go to the tensorboardX `writer` at `step`; returns the scores.
    """
    import render
    from gqn_dataset import fixed_views

    size = size or model.config["image_size"]
    context = min(context, test_ds.views - 1)
    was_training = model.training
    model.eval()
    baseline = mean_image(train_ds, size, baseline_scenes, progress=progress)
    r = evaluate(model, test_ds, context, seed, 32, device, size, baseline, progress=progress)
    for k in ("elbo", "kl", "nll", "bits_per_dim", "mae", "rmse", "mean_image_mae", "mean_image_rmse",
              "rmse_ratio"):
        writer.add_scalar(f"eval/{k}", r[k], step)
    for i in np.linspace(0, len(test_ds) - 1, min(image_scenes, len(test_ds))).round().astype(int).tolist():
        frames, cameras = test_ds[i]
        ctx, _ = fixed_views(seed, i, test_ds.views, context)
        panels = render.novel_views(model, frames, cameras, ctx, 12, seed, size)
        writer.add_image(f"eval/novel_views/scene_{i}", np.asarray(render.grid(panels, scale=2)), step,
                         dataformats="HWC")
    writer.flush()
    model.train(was_training)
    return r


def write_json(path, obj):
    """Atomic (checkpoint.atomic_write): a reader never sees half a file."""
    from checkpoint import atomic_write

    try:
        atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())
    except OSError as err:
        raise UserError(f"--json {path}: cannot write ({err.strerror or err})") from None


def table(r):
    rows = [("scenes", f"{r['scenes']}"), ("context views", f"{r['context']}"),
            (f"ELBO (nats/image, sigma {r['sigma']})", f"{r['elbo']:.2f}"),
            ("KL (nats/image)", f"{r['kl']:.2f}"), ("NLL (nats/image)", f"{r['nll']:.2f}"),
            ("bits/dim", f"{r['bits_per_dim']:.4f}"),
            ("MAE (0-255)", f"{r['mae']:.3f}"), ("RMSE (0-255)", f"{r['rmse']:.3f}")]
    if "mean_image_rmse" in r:
        rows += [("mean-image MAE (0-255)", f"{r['mean_image_mae']:.3f}"),
                 ("mean-image RMSE (0-255)", f"{r['mean_image_rmse']:.3f}"),
                 ("RMSE / mean-image RMSE", f"{r['rmse_ratio']:.3f}")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v:>12}" for k, v in rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (e.g. <run>/checkpoints/latest.pt)")
    p.add_argument("--test_data_dir", required=True, help="converted test split folder")
    p.add_argument("--train_data_dir", default=None,
                   help="training split folder: also score the mean-training-image baseline")
    p.add_argument("--baseline_scenes", type=int, default=2000,
                   help="training scenes averaged for the mean image, spread over the split (0 = all)")
    p.add_argument("--context", type=int, default=3, help="context views per scene (K)")
    p.add_argument("--max_scenes", type=int, default=0, help="score only the first N test scenes (0 = all)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="chooses the views and the noise")
    p.add_argument("--json", default=None, help="also write the results here (atomically)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding JPEGs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size}: must be at least 1")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: must be at least 0")
    if args.max_scenes < 0:
        p.error(f"--max_scenes {args.max_scenes}: must be at least 0 (0 = all)")
    if args.baseline_scenes < 0:
        p.error(f"--baseline_scenes {args.baseline_scenes}: must be at least 0 (0 = all)")
    return args


def open_device(name):
    """torch.device(name), checked by allocating on it: a missing CUDA device is one clear line."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {name}: not available ({str(e).splitlines()[0]})") from None
    return device


def run(args):
    device = open_device(args.device)
    if args.json and os.path.isdir(args.json):  # found out before the long run, not after it
        raise UserError(f"--json {args.json}: is a folder; give a file name")
    model, ckpt = load_model(args.checkpoint, device)
    ds = open_split(args.test_data_dir, "--test_data_dir")
    size = input_size(ckpt, ds, args.test_data_dir, "--test_data_dir")
    baseline = None
    if args.train_data_dir:
        train = open_split(args.train_data_dir, "--train_data_dir")
        input_size(ckpt, train, args.train_data_dir, "--train_data_dir")
        baseline = mean_image(train, size, args.baseline_scenes, args.workers)
    r = evaluate(model, ds, args.context, args.seed, args.batch_size, device, size, baseline, args.workers,
                 max_scenes=args.max_scenes)
    r = {"checkpoint": os.path.abspath(args.checkpoint), "step": ckpt.get("step"),
         "dataset": ds.dataset, "test_data_dir": os.path.abspath(args.test_data_dir),
         "train_data_dir": os.path.abspath(args.train_data_dir) if args.train_data_dir else None, **r}
    print(f"{args.checkpoint} (step {r['step']}) on {args.test_data_dir}")
    print(table(r))
    if args.json:
        write_json(args.json, r)
        print(f"wrote {args.json}")
    return r


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (UserError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
