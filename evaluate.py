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
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import cli
from checkpoint import atomic_write, input_size, load_model
from cli import UserError
from gqn_dataset import FixedViews, fixed_views, open_split, resize
from metrics import bits_per_dim, image_errors
from pictures import novel_views, panels_grid

SIGMA = 0.7  # the final pixel sigma of the paper's annealing schedule: the likelihood the scores refer to


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
    loader = torch.utils.data.DataLoader(FixedViews(ds, context, seed, scenes), batch_size=batch_size,
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
        panels = novel_views(model, frames, cameras, ctx, 12, seed, size)
        writer.add_image(f"eval/novel_views/scene_{i}", np.asarray(panels_grid(panels, scale=2)), step,
                         dataformats="HWC")
    writer.flush()
    model.train(was_training)
    return r


def write_json(path, obj):
    """Atomic (checkpoint.atomic_write): a reader never sees half a file."""
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
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--checkpoint", required=True, help="a train.py checkpoint (e.g. <run>/checkpoints/latest.pt)")
    a("--test_data_dir", required=True, help="converted test split folder")
    a("--train_data_dir", default=None, help="training split folder: also score the mean-training-image baseline")
    a("--baseline_scenes", type=cli.nonneg_int, default=2000,
      help="training scenes averaged for the mean image, spread over the split (0 = all; default 2000)")
    a("--context", type=cli.positive_int, default=3, help="context views per scene (default 3)")
    a("--max_scenes", type=cli.nonneg_int, default=0, help="score only the first N test scenes (default 0 = all)")
    a("--batch_size", type=cli.positive_int, default=32, help="scenes per batch (default 32)")
    a("--seed", type=cli.nonneg_int, default=0, help="chooses the views and the noise (default 0)")
    a("--json", default=None, help="also write the results here (atomically)")
    a("--workers", type=cli.nonneg_int, default=0, help="DataLoader workers decoding JPEGs (default 0)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu, cuda or cuda:N (default: cuda when present)")
    return p.parse_args(argv)


def run(args):
    device = cli.open_device(args.device)
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
    return cli.main(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
