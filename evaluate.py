"""Evaluate a trained GQN over a whole test split (Eslami et al. 2018), for one or several context sizes.

Reports what the paper trains for, the negative ELBO (eq. S9's terms: KL and the Gaussian NLL of the query
image, in nats per image at the final pixel sigma of 0.7), and what it is judged by, the quality of the
generated query view: the image predicted for v_q with z drawn from the prior (figure S2's generation
core), taken as the observation mean clamped to [0, 1], compared with the true x_q. The image scores
(metrics.image_scores) are per image, then averaged over images: MAE and RMSE on the 0-255 scale, as in
ViewFormer's and STR-GQN's tables; PSNR (dB) and SSIM from torchmetrics on images in [0, 1] (data_range 1.0;
a perfect image's PSNR is inf, written to JSON as Infinity). With --train_data_dir it also scores the trivial
baseline that predicts the mean training image for every query (mean_image_*, rmse_ratio).

--samples N draws N views from the prior per query: mae/rmse/psnr/ssim stay the first draw's (the one
--samples 1 makes); mean_of_samples_* score the pixel-wise mean of the N draws and best_of_samples_* each
image's draw with the lowest RMSE (the best-of-N of the GQN literature).

Views are deterministic (sampling.fixed_views): each scene gets the same K context views and query view
for a given --seed, and the ELBO's posterior noise is a function of (seed, scene) alone. The query view
depends on K (the view after a scene's first K of one fixed permutation), so each context size, its
mean-image scores included, reports exactly what `--context K` alone does. Draw i of a batch comes from a
generator seeded by (seed, batch, i), so the image scores repeat exactly for the same --seed and --batch_size.

The JSON (--json) and main()'s return value, with one context size: one flat dict, the run (checkpoint, step,
dataset, test_data_dir, train_data_dir), then scenes, context, seed, sigma, image_size, samples, elbo, kl,
nll, bits_per_dim, mae, rmse, psnr, ssim, [mean_of_samples_* and best_of_samples_* of the four when samples
> 1], [mean_image_* of the four and rmse_ratio with --train_data_dir], kl_per_step, [the draws' scores when
samples > 1], unreadable. With several context sizes: the run, scenes, seed, sigma, image_size, samples,
"contexts": [1, 2, ...], and "by_context": {"1": {...}, ...} with each size's other fields.

A test scene that cannot be read (a bad JPEG, a damaged or missing file) is left out of every score and named on
stderr; "scenes" counts the scenes scored and "unreadable" lists those left out as [scene, why] ("scenes" is given
per context size when the sizes read different views of a damaged scene); "unreadable_files" lists the files left
out whole. The mean image skips them too.

--plot FILE.png draws RMSE, MAE, PSNR and SSIM against the number of context views.

Images stored at another size than the model's are resized with area interpolation only when that is what
training did (the checkpoint records the stored size it trained on); any other size mismatch is an error.

    python evaluate.py --checkpoint runs/default/checkpoints/latest.pt --test_data_dir data/builtin/shepard_metzler_5_parts/test
    python evaluate.py --checkpoint C --test_data_dir D --train_data_dir T --context 1 2 3 5 --samples 4 \
        --plot context.png --json results.json
"""
import io
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np
import torch

import cli
from checkpoint import input_size, load_model, run_seed
from files import write_out
from cli import UserError
from gqn_dataset import (FixedViews, Unreadable, WholeScenes, collate_readable, fixed_views, open_split,
                         read_or_skip, resize)
from metrics import (FRACTIONS, best_of, bits_per_dim, draw_scores, image_scores, latent_verdict, nll_at,
                     object_sums)
from pictures import novel_views, panels_grid
from progress import progress_bar

SIGMA = 0.7  # the final pixel sigma of the paper's annealing schedule: an ELBO reported at it compares runs
SCORES = (("rmse", "RMSE (0-255)", ".3f"), ("mae", "MAE (0-255)", ".3f"), ("psnr", "PSNR (dB)", ".2f"),
          ("ssim", "SSIM", ".4f"))  # metrics.image_scores: (key, name, format)
SHARED = ("scenes", "seed", "sigma", "image_size", "samples")  # a multi-context JSON's fields common to every size
BASELINE_SCENES = 2000  # training scenes the mean image averages, here and at the end of train.py


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

    The scenes are spread evenly over the split (all of them when max_scenes is 0 or larger than the split); those
    that cannot be read are left out (evaluate() names them).
    """
    n = len(ds)
    idx = list(range(n)) if max_scenes <= 0 or max_scenes >= n else \
        sorted(set(np.linspace(0, n - 1, max_scenes).round().astype(int).tolist()))
    loader = torch.utils.data.DataLoader(WholeScenes(ds, idx), batch_size=None, num_workers=workers)
    total, count = torch.zeros(3, size, size, dtype=torch.float64), 0
    for item in progress_bar(loader, desc="mean image", unit="scene", disable=not progress, leave=False):
        if isinstance(item, Unreadable):
            continue
        total += resize(item[0], size).double().sum(0)
        count += item[0].shape[0]
    if count == 0:
        raise UserError(f"{ds.root}: none of the {len(idx)} scenes for the mean image can be read")
    return (total / count).float()


# ----------------------------------------------------------------------------- evaluation

def check_context(context, ds):
    if not 1 <= context <= ds.views - 1:
        raise UserError(f"--context {context}: must be between 1 and {ds.views - 1} "
                        f"(the data has {ds.views} views per scene and one is the query)")


def sample_seed(seed, batch, i):
    """Seed of the generator for draw i of a batch: a function of (seed, batch, i); draw 0's is (seed, batch)'s."""
    return (i * 1_000_003 + seed) * 1_000_003 + batch


@torch.no_grad()
def evaluate(model, ds, context=3, seed=0, batch_size=32, device="cpu", size=None, baseline=None,
             workers=0, progress=True, max_scenes=0, samples=1, reference=None, sigma=SIGMA):
    """Score model on every scene of ds (the first max_scenes if > 0) -> dict of means (module docstring). baseline:
    the mean training image (3, H, W) on 0-255, scored on the same queries; sigma: the ELBO's pixel σ (the run's
    final σ; also given at SIGMA, the paper's); samples: draws from the prior per query (their scores when > 1);
    reference: whose departures mark the draws' informative pixels (metrics.informative; default: baseline).
    Unreadable scenes are left out of every score and listed in "unreadable" as [scene, why]."""
    reference = baseline if reference is None else reference
    if samples > 1 and reference is None:
        raise ValueError("scores of several draws need a reference image (the mean training image)")
    check_context(context, ds)
    size = size or model.config["image_size"]
    scenes = range(min(max_scenes, len(ds)) if max_scenes > 0 else len(ds))
    objects = ds.has_objects
    loader = torch.utils.data.DataLoader(FixedViews(ds, context, seed, scenes, objects), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate_readable)
    g = torch.Generator(device=device)
    sums, n = defaultdict(float), 0
    kl_steps, curves, spread_max, unreadable = 0, {"model": [], "oracle": []}, 0.0, []

    def add(prefix, scores):
        for k, per_image in scores.items():
            sums[prefix + k] += per_image.double().sum().item()

    for batch, (readable, bad) in enumerate(progress_bar(loader, desc=f"evaluate {context} context views",
                                                         unit="batch", disable=not progress)):
        unreadable += [list(u) for u in bad]
        if readable is None:
            continue
        x, v, x_q, v_q, scenes = readable[:5]
        x = (resize(x, size) / 255).to(device)  # (B, K, 3, H, W) in [0, 1]
        x_q255 = resize(x_q, size)  # (B, 3, H, W) on 0-255
        v, v_q = v.to(device), v_q.to(device)
        eps = posterior_noise(model.noise_shape, seed, scenes).to(device)
        out = model(x, v, v_q, (x_q255 / 255).to(device), sigma, eps=eps)
        add("", {"elbo": out.elbo, "kl": out.kl, "nll": out.nll})
        kl_steps = kl_steps + out.kl_steps.double().sum(0).cpu()
        draws = draw_views(model, x, v, v_q, samples, g, seed, batch)  # (N, B, 3, H, W) in [0, 1]
        if objects:
            add_objects(sums, draws, x_q255, *readable[5:], size)
        draws = draws * 255
        add("", image_scores(draws[0], x_q255))
        if samples > 1:
            spread_max = max(spread_max, add_draws(add, draws, x_q255, reference, curves))
        if baseline is not None:
            add("mean_image_", image_scores(baseline.expand_as(x_q255), x_q255))
        n += x.shape[0]
    if n == 0:
        raise UserError(f"{ds.root}: none of the {len(loader.dataset)} scenes can be read (the first: "
                        f"{unreadable[0][1]})")
    m = {k: s / n for k, s in sums.items()}
    elbo = elbo_scores({k: m.pop(k) for k in ("elbo", "kl", "nll")}, sigma, 3 * size * size)
    result = {"scenes": n, "context": context, "seed": seed, "sigma": sigma, "image_size": size, "samples": samples,
              **elbo, **m}  # then the image scores
    if baseline is not None:
        result["rmse_ratio"] = ratio(m["rmse"], m["mean_image_rmse"])
    result.update(kl_per_step=(kl_steps / n).tolist(), **object_scores(result, ds), unreadable=unreadable)
    if samples > 1:
        result.update(draws_summary(result, {k: torch.cat(v) for k, v in curves.items()}, spread_max == 0))
    return result


def add_draws(add, draws, x_q255, reference, curves):
    """A batch's scores of several draws (N, B, 3, H, W) on 0-255 added: their mean's, their best's and metrics'
    draw scores (curves extended) -> the largest spread of a pixel."""
    add("mean_of_samples_", image_scores(draws.mean(0), x_q255))
    add("best_of_samples_", best_of(draws, x_q255))
    scores, c = draw_scores(draws, x_q255, reference)
    add("draws_", scores)
    for k in curves:
        curves[k].append(c[k])
    return draws.std(0).max().item()


def draw_views(model, x, v, v_q, samples, g, seed, batch):
    """`samples` views drawn from the prior for each query of a batch, each draw from its own seed -> (N, B, 3, H,
    W) in [0, 1]."""
    draws = []
    for i in range(samples):
        g.manual_seed(sample_seed(seed, batch, i))
        draws.append(model.generate(x, v, v_q, generator=g).clamp(0, 1).cpu())
    return torch.stack(draws)


def elbo_scores(elbo, sigma, dims):
    """The mean ELBO, KL and NLL at the run's σ -> with bits/dim, and the ELBO and NLL at the paper's σ (SIGMA)."""
    nll = nll_at(elbo["nll"], sigma, SIGMA, dims)
    return {**elbo, "bits_per_dim": bits_per_dim(-elbo["elbo"], dims), f"nll_sigma_{SIGMA}": nll,
            f"elbo_sigma_{SIGMA}": -(elbo["kl"] + nll)}


def ratio(a, b):
    return a / b if b > 0 else float("nan")


def add_objects(sums, draws, x_q255, empty, masks, size):
    """A batch's squared errors over the pixels its objects change (draws (N, B, 3, H, W) in [0, 1]): the first
    draw's, the draws' mean's, the empty room's (metrics.object_sums), at the model's size (the masks area-resized to shares of a pixel)."""
    truth, room = x_q255 / 255, resize(empty, size) / 255
    weight = resize(masks[:, None].float(), size)
    for prefix, pred in (("", draws[0]), ("mean_of_samples_", draws.mean(0) if len(draws) > 1 else None)):
        if pred is not None:
            model_sq, room_sq, w = object_sums(pred, truth, room, weight)
            sums[prefix + "objects_model"] += model_sq
            sums[prefix + "objects_room"] += room_sq
            sums[prefix + "objects_weight"] += w


def object_scores(r, ds):
    """The object score (metrics.object_sums) from evaluate()'s means (keys popped from r), or why there is none."""
    if not ds.has_objects:
        return {"object_score": None, "object_score_why": f"{ds.root}'s scenes do not record what their objects "
                                                          f"change (the built-in rooms of dataset/rooms.py do)"}
    out = {}
    for prefix in ("", "mean_of_samples_"):
        if prefix + "objects_model" in r:
            model, room, w = (r.pop(prefix + "objects_" + k) for k in ("model", "room", "weight"))
            out[prefix + "object_score"] = math.sqrt(model / room) if room > 0 else float("nan")
            if not prefix:
                out["object_rmse"], out["empty_room_rmse"] = (255 * math.sqrt(ratio(s, w)) for s in (model, room))
                out["object_pixels"] = w / (3 * r["image_size"] ** 2)  # w is already a mean over the scenes
    return out


def draws_summary(r, curves, deterministic):
    """evaluate()'s means of metrics.draw_scores (keys draws_*, popped from r) -> the draws' scores: spread,
    calibration, sparsification and AUSE, and the verdict on the latent (metrics.latent_verdict)."""
    d = {k[len("draws_"):]: r.pop(k) for k in [k for k in r if k.startswith("draws_")]}
    have = ~curves["model"].isnan().any(1)  # images with a sparsification curve
    model, oracle = curves["model"][have].mean(0), curves["oracle"][have].mean(0)
    ause, ause_random = (model - oracle).mean().item(), (1 - oracle).mean().item()
    out = {"spread": d["spread"], "informative_pixels": d["informative"], "spread_informative": d["spread_i"],
           "error_informative": d["error_i"], "spread_to_error": ratio(d["spread_i"], d["error_i"]),
           "best_of_ratio": ratio(r["best_of_samples_rmse"], r["mean_of_samples_rmse"]),
           "in_range": d["in_range"], "in_2sd": d["in_2sd"], "pixel_nll": d["nll"], "spearman": d["spearman"],
           "ause": ause, "ause_random": ause_random, "ause_ratio": ratio(ause, ause_random),
           "sparsification": {"fractions": FRACTIONS.tolist(), "model": model.tolist(), "oracle": oracle.tolist(),
                              "images": int(have.sum())},
           "deterministic": deterministic}
    out["latent"] = latent_verdict(deterministic, out["best_of_ratio"], out["spread_to_error"])
    return out


def end_of_training(writer, step, model, train_ds, test_ds, context=3, seed=0, device="cpu", size=None,
                    image_scenes=2, baseline_scenes=BASELINE_SCENES, progress=True, sigma=SIGMA):
    """What train.py logs when a run ends: this file's scores over the whole test split and render.py's views.

    Scalars eval/<metric> and images eval/novel_views/scene_<i> (context, a ring of new viewpoints, the
    scene's other views beside their truth) go to the tensorboardX `writer` at `step`; returns the scores.
    """
    size = size or model.config["image_size"]
    context = min(context, test_ds.views - 1)
    was_training = model.training
    model.eval()
    baseline = mean_image(train_ds, size, baseline_scenes, progress=progress)
    r = evaluate(model, test_ds, context, seed, 32, device, size, baseline, progress=progress, sigma=sigma)
    for k in ("elbo", "kl", "nll", "bits_per_dim", f"elbo_sigma_{SIGMA}", "mae", "rmse", "psnr", "ssim",
              "mean_image_mae", "mean_image_rmse", "mean_image_psnr", "mean_image_ssim", "rmse_ratio", "object_score"):
        if r[k] is not None:
            writer.add_scalar(f"eval/{k}", r[k], step)
    for i in np.linspace(0, len(test_ds) - 1, min(image_scenes, len(test_ds))).round().astype(int).tolist():
        scene = read_or_skip(lambda: test_ds[i], i)
        if isinstance(scene, Unreadable):  # evaluate() above named it
            continue
        frames, cameras = scene
        ctx, _ = fixed_views(seed, i, test_ds.views, context)
        panels = novel_views(model, frames, cameras, ctx, 12, seed, size)
        writer.add_image(f"eval/novel_views/scene_{i}", np.asarray(panels_grid(panels, scale=2)), step,
                         dataformats="HWC")
    writer.flush()
    model.train(was_training)
    return r


# ----------------------------------------------------------------------------- output

def by_context(results):
    """evaluate()'s dicts, one per context size -> the JSON layout of the module docstring."""
    if len(results) == 1:
        return results[0]
    # scenes differs between sizes only when a damaged view is read by some of them: then each size says its own
    shared = {k: results[0][k] for k in SHARED if all(r[k] == results[0][k] for r in results)}
    return {**shared, "contexts": [r["context"] for r in results],
            "by_context": {str(r["context"]): {k: v for k, v in r.items() if k not in shared} for r in results}}


def predictions(samples):
    """(key prefix, label) of each scored prediction: one draw, mean and best of N draws, the mean image."""
    return [("", "one draw" if samples > 1 else "generated view"), ("mean_of_samples_", f"mean of {samples} draws"),
            ("best_of_samples_", f"best of {samples} draws"), ("mean_image_", "mean training image")]


def table(results):
    """The scores as text, a column per context size."""
    r0 = results[0]
    lines = [(f"ELBO (nats/image, the run's sigma {r0['sigma']:g})", "elbo", ".2f"), ("KL (nats/image)", "kl", ".2f"),
             ("NLL (nats/image)", "nll", ".2f"), ("bits/dim", "bits_per_dim", ".4f"),
             (f"ELBO at sigma {SIGMA} (the paper's, to compare runs)", f"elbo_sigma_{SIGMA}", ".2f")]
    lines += [(f"{what}: {name}", prefix + key, fmt) for prefix, what in predictions(r0["samples"])
              for key, name, fmt in SCORES]
    lines.append(("RMSE / mean-image RMSE", "rmse_ratio", ".3f"))
    lines += [("objects' pixels: share of the view", "object_pixels", ".3f"),
              ("objects' pixels: RMSE (0-255)", "object_rmse", ".3f"), ("objects' pixels: empty room's RMSE",
              "empty_room_rmse", ".3f"), ("object score (empty room 1, truth 0)", "object_score", ".3f"),
              (f"object score, mean of {r0['samples']} draws", "mean_of_samples_object_score", ".3f")]
    lines += DRAW_LINES
    rows = [("context views", [r["context"] for r in results])]
    rows += [(label, [format(r[key], fmt) for r in results]) for label, key, fmt in lines if r0.get(key) is not None]
    rows += [(f"KL of step {l + 1} (nats/image)", [f"{r['kl_per_step'][l]:.3f}" for r in results])
             for l in range(len(r0["kl_per_step"]))]
    if "latent" in r0:
        rows.append(("the latent", [r["latent"] for r in results]))
    w = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{w}}" + "".join(f"  {v:>9}" for v in values) for label, values in rows)


# The draws' scores (samples > 1): label, key, format. "informative pixels": metrics.informative.
DRAW_LINES = [("draws: spread, all pixels (0-255)", "spread", ".3f"),
              ("draws: informative pixels (share)", "informative_pixels", ".3f"),
              ("draws: spread, informative pixels", "spread_informative", ".3f"),
              ("draws' mean: error, informative pixels", "error_informative", ".3f"),
              ("spread / error (calibrated: about 1)", "spread_to_error", ".3f"),
              ("best draw's RMSE / draws' mean's", "best_of_ratio", ".4f"),
              ("truth within the draws' range (share)", "in_range", ".3f"),
              ("truth within mean +- 2 spread (share)", "in_2sd", ".3f"),
              ("truth's NLL under the draws (nats/pixel)", "pixel_nll", ".3f"),
              ("Spearman of spread and error", "spearman", ".3f"),
              ("AUSE (sparsification)", "ause", ".4f"),
              ("AUSE / a random order's", "ause_ratio", ".3f")]

# The lines of predictions(), in order: markers that stay apart where the lines coincide.
STYLES = (dict(marker="o", ms=8), dict(marker="s", ms=5, ls=":"), dict(marker="^", ms=5, ls="-."),
          dict(color="grey", ls="--"))


def plot(path, results, title):
    """RMSE, MAE, PSNR and SSIM against the number of context views, a panel each, as a PNG (Agg) at path; with
    several draws also the sparsification curves and each generation step's KL."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = [r["context"] for r in results]
    draws = "sparsification" in results[0]
    fig = Figure(figsize=(13.5 if draws else 9, 6.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 3 if draws else 2)
    if draws:
        plot_draws(axes[:, 2], results)
        axes = axes[:, :2]
    for ax, (key, name, _) in zip(axes.flat, SCORES):
        for (prefix, what), style in zip(predictions(results[0]["samples"]), STYLES):
            if prefix + key in results[0]:
                ax.plot(ks, [r[prefix + key] for r in results], label=what, **style)
        better = "higher" if key in ("psnr", "ssim") else "lower"
        ax.set(xlabel="context views", ylabel=f"{name}, {better} is better", xticks=ks)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    write_out("--plot", path, buf.getvalue())


def plot_draws(axes, results):
    """Two panels: each context size's sparsification curve beside its oracle's (the area between them is the AUSE),
    and the KL of each generation step."""
    for r, colour in zip(results, ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9") * 10):
        s = r["sparsification"]
        views = f"{r['context']} view{'s' if r['context'] > 1 else ''}"
        axes[0].plot(s["fractions"], s["model"], color=colour, label=f"{views} (AUSE/random {r['ause_ratio']:.2f})")
        axes[0].plot(s["fractions"], s["oracle"], color=colour, ls=":")
        steps = range(1, len(r["kl_per_step"]) + 1)
        axes[1].plot(steps, r["kl_per_step"], marker="o", color=colour, label=views)
    axes[0].plot([], [], color="grey", ls=":", label="removed by error (oracle)")
    axes[0].axhline(1, color="grey", ls="--", lw=1, label="removed at random")
    axes[0].set(xlabel="informative pixels removed, most uncertain first", ylabel="RMSE of the rest / of all",
                title="sparsification")
    axes[1].set(xlabel="generation step l", ylabel="KL(q(z_l) || π(z_l)), nats/image", title="KL per step",
                xticks=list(steps))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def run_sigma(ckpt):
    """The final pixel σ of the run a checkpoint comes from (its config's sigma_f), the σ its ELBO is reported at;
    SIGMA for a checkpoint that records none."""
    sigma = (ckpt.get("config") or {}).get("sigma_f")
    return float(sigma) if isinstance(sigma, (int, float)) and sigma > 0 else SIGMA


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--checkpoint", required=True, help="a train.py checkpoint (e.g. <run>/checkpoints/latest.pt)")
    a("--test_data_dir", required=True, help="converted test split folder")
    a("--train_data_dir", default=None, help="training split folder: also score the mean-training-image baseline")
    a("--baseline_scenes", type=cli.nonneg_int, default=BASELINE_SCENES,
      help=f"training scenes averaged for the mean image, spread over the split (0 = all; default {BASELINE_SCENES}, "
           f"as train.py's end-of-run score)")
    a("--context", type=cli.positive_int, nargs="+", default=[3],
      help="context views per scene; several sizes (e.g. 1 2 3 5) are scored in one run (default 3)")
    a("--samples", type=cli.positive_int, default=1,
      help="views drawn from the prior per query: also score their mean and the best of them (default 1)")
    a("--max_scenes", type=cli.nonneg_int, default=0, help="score only the first N test scenes (default 0 = all)")
    a("--batch_size", type=cli.positive_int, default=32, help="scenes per batch (default 32)")
    a("--seed", type=cli.nonneg_int, default=None,
      help="chooses the views and the noise (default: the run's --seed, so that the scores are the ones train.py "
           "gave at the end of the run)")
    a("--json", default=None, help="also write the results here (atomically)")
    a("--plot", default=None, help="FILE.png: draw the scores against the number of context views")
    a("--workers", type=cli.nonneg_int, default=0, help="DataLoader workers decoding JPEGs (default 0)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu, cuda or cuda:N (default: cuda when present)")
    return p.parse_args(argv)


def run(args):
    device = cli.open_device(args.device)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and os.path.isdir(path):  # found out before the long run, not after it
            raise UserError(f"{flag} {path}: is a folder; give a file name")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UserError(f"--plot {args.plot}: must end in .png")
    model, ckpt = load_model(args.checkpoint, device)
    if args.seed is None:
        args.seed = run_seed(ckpt)
    ds = open_split(args.test_data_dir, "--test_data_dir", skip_unreadable=True)
    size = input_size(ckpt, ds, args.test_data_dir, "--test_data_dir")
    contexts = sorted(set(args.context))
    for k in contexts:
        check_context(k, ds)
    baseline = None
    if args.train_data_dir:
        train = open_split(args.train_data_dir, "--train_data_dir", skip_unreadable=True)
        for _, why in train.unreadable:
            print(f"warning: {why}; the mean image goes without it", file=sys.stderr)
        input_size(ckpt, train, args.train_data_dir, "--train_data_dir")
        baseline = mean_image(train, size, args.baseline_scenes, args.workers)
    # the draws' scores look at the pixels the data set's average view does not predict: the training split's mean
    # image, or without --train_data_dir the test split's own
    reference = baseline if baseline is not None or args.samples == 1 else \
        mean_image(ds, size, args.baseline_scenes, args.workers)
    sigma = run_sigma(ckpt)
    results = [evaluate(model, ds, k, args.seed, args.batch_size, device, size, baseline, args.workers,
                        max_scenes=args.max_scenes, samples=args.samples, reference=reference, sigma=sigma)
               for k in contexts]
    r = {"checkpoint": os.path.abspath(args.checkpoint), "step": ckpt.get("step"),
         "dataset": ds.dataset, "test_data_dir": os.path.abspath(args.test_data_dir),
         "train_data_dir": os.path.abspath(args.train_data_dir) if args.train_data_dir else None,
         **by_context(results), "unreadable_files": [[path, why] for path, why in ds.unreadable]}
    left_out = {scene: why for result in results for scene, why in result["unreadable"]}
    for scene, why in sorted(left_out.items()):
        print(f"warning: left out test scene {scene}, which cannot be read ({why})", file=sys.stderr)
    for _, why in ds.unreadable:
        print(f"warning: left out every scene of {why}", file=sys.stderr)
    gone = [f"{n} {what} left out" for n, what in ((len(left_out), "unreadable scene(s)"),
                                                   (len(ds.unreadable), "unreadable file(s)")) if n]
    print(f"{args.checkpoint} (step {r['step']}) on {args.test_data_dir}: {results[0]['scenes']} scenes"
          f"{' (' + ', '.join(gone) + ')' if gone else ''}, seed {args.seed}")
    print(table(results))
    if results[0]["object_score"] is None:
        print(f"no object score: {results[0]['object_score_why']}")
    if args.plot:
        plot(args.plot, results, f"{ds.dataset}, step {r['step']}: {r['scenes']} test scenes, seed {args.seed}")
        print(f"wrote {args.plot}")
    if args.json:
        write_out("--json", args.json, (json.dumps(r, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return r


def main(argv=None):
    return cli.main(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
