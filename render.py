"""Render novel views of one scene with a trained GQN (Eslami et al. 2018, figure 1 and the rendering figures).

The model sees context views of the scene (by default `--context` of them, chosen by `--seed` as evaluate.py
chooses them; or `--context_views` by index) and its generation core (figure S2, z from the prior) renders:
  - a ring of new viewpoints around the scene (cameras.ring: DeepMind's look-at cameras at the scene's own
    distance and pitch, the yaw starting at the first context view's), and the scene's own remaining views beside
    their ground truth; or
  - cameras of your choosing: `--yaw` (degrees, one or more) at `--pitch` degrees and `--distance` scene units,
    looking at the scene's centre; or `--poses FILE`, a text file of one camera a line, as DeepMind's 7-d pose
    (x y z sin_yaw cos_yaw sin_pitch cos_pitch) or its 5 raw numbers (x y z yaw pitch, radians).
`--samples N` draws z N times per view: a row a sample, and a row of their per-pixel standard deviation (white:
0.25 and more), which shows where the model is unsure of what the view holds.

A .png is one grid (rows: context, novel views, truth, model); a .gif plays the views, each frame showing the
context, the model's view (the first sample) and the truth (blank where there is none). The pictures are drawn
by pictures.py, which train.py and evaluate.py share.

    python render.py --checkpoint runs/default/checkpoints/latest.pt --data_dir data/shepard_metzler_5_parts/test \
        --scene 0 --out scene0.png
    python render.py ... --context_views 0 5 --yaw 0 45 90 --pitch 20 --samples 4 --out mine.png
"""
import math
import os

import torch

import cli
from checkpoint import input_size, load_model, run_seed
from cli import UserError
from cameras import look_at, pose7
from gqn_dataset import DatasetError, fixed_views, open_split
from pictures import novel_views, save_panels


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--checkpoint", required=True, help="a train.py checkpoint (e.g. <run>/checkpoints/latest.pt)")
    a("--data_dir", required=True, help="converted split folder holding the scene")
    a("--scene", type=cli.nonneg_int, default=0, help="scene index within the split (default 0)")
    a("--out", required=True, help="output .png (grid) or .gif (animation)")
    a("--context", type=cli.positive_int, default=3, help="context views the model sees (default 3)")
    a("--views", type=cli.nonneg_int, default=12, help="novel viewpoints around the ring (default 12; 0: none)")
    a("--pitch", type=float, default=None,
      help="pitch of the ring or of --yaw's cameras in degrees (default: the mean pitch of the scene's cameras)")
    a("--context_views", type=cli.nonneg_int, nargs="+", help="the context views by index (default: --context views "
                                                                "chosen by --seed)")
    a("--query_views", type=cli.nonneg_int, nargs="+",
      help="which of the scene's other views to draw beside their truth, by index (default: all of them)")
    a("--yaw", type=float, nargs="+", help="cameras of your choosing instead of the ring: their yaws in degrees")
    a("--distance", type=cli.positive_float,
      help="--yaw's cameras' distance from the scene's centre (default: the scene's cameras' mean distance)")
    a("--poses", help="cameras of your choosing instead of the ring: a text file, a camera a line, 7-d poses "
                      "(x y z sin_yaw cos_yaw sin_pitch cos_pitch) or 5 raw numbers (x y z yaw pitch, radians)")
    a("--samples", type=cli.positive_int, default=1,
      help="z drawn this many times per view; above 1, also their per-pixel spread (default 1)")
    a("--scale", type=cli.positive_int, default=2,
      help="enlarge each view this many times, nearest neighbour (default 2)")
    a("--seed", type=cli.nonneg_int, default=None,
      help="chooses the context views (as evaluate.py) and z (default: the run's --seed)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu, cuda or cuda:N (default: cuda when present)")
    args = p.parse_args(argv)
    if os.path.splitext(args.out)[1].lower() not in (".png", ".gif"):
        raise UserError(f"--out {args.out}: must end in .png or .gif")
    if args.yaw and args.poses:
        raise UserError("--yaw and --poses: give one of them")
    return args


def read_poses(path):
    """--poses FILE -> 7-d poses (N, 7): a camera a line, 7 numbers (the pose) or 5 (raw x y z yaw pitch)."""
    try:
        with open(path) as f:
            lines = [(n, line.replace(",", " ").split()) for n, line in enumerate(f, 1)]
    except OSError as e:
        raise UserError(f"--poses {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--poses {path}: not a text file ({e.reason} at byte {e.start})") from None
    rows = []
    for n, words in lines:
        if not words or words[0].startswith("#"):
            continue
        try:
            row = torch.tensor([float(w) for w in words])  # float32, as the model reads it
        except ValueError:
            row = torch.zeros(0)
        if len(row) not in (5, 7) or not row.isfinite().all():  # 1e39 is finite, but not in float32
            raise UserError(f"--poses {path}: line {n}: expected 7 or 5 finite numbers, got "
                            f"{' '.join(words)[:80]!r}")
        rows.append(pose7(row) if len(row) == 5 else row)
    if not rows:
        raise UserError(f"--poses {path}: holds no camera")
    return torch.stack(rows)


def query_poses(args, cameras):
    """Cameras of the user's choosing (N, 7), or None for the ring and the held-out views."""
    if args.poses:
        return read_poses(args.poses)
    if args.yaw:
        distance = args.distance or float(cameras[:, :3].norm(dim=-1).mean())
        pitch = math.radians(args.pitch) if args.pitch is not None else float(torch.atan2(cameras[:, 5],
                                                                                          cameras[:, 6]).mean())
        return look_at(distance, torch.tensor([math.radians(y) for y in args.yaw]), torch.tensor(pitch))
    return None


def run(args):
    device = cli.open_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    if args.seed is None:
        args.seed = run_seed(ckpt)
    ds = open_split(args.data_dir, "--data_dir")
    size = input_size(ckpt, ds, args.data_dir, "--data_dir")
    if not args.scene < len(ds):
        raise UserError(f"--scene {args.scene}: {args.data_dir} has scenes 0..{len(ds) - 1}")
    if not args.context <= ds.views - 1:
        raise UserError(f"--context {args.context}: must be between 1 and {ds.views - 1} "
                        f"(the data has {ds.views} views per scene)")
    if args.context_views and (max(args.context_views) >= ds.views or len(set(args.context_views)) <
                               len(args.context_views)):
        raise UserError(f"--context_views {' '.join(map(str, args.context_views))}: need distinct views of "
                        f"0..{ds.views - 1}")
    try:
        frames, cameras = ds[args.scene]
    except DatasetError as e:
        raise UserError(f"--data_dir {e}") from None
    context = args.context_views or fixed_views(args.seed, args.scene, ds.views, args.context)[0].tolist()
    if args.query_views and (set(args.query_views) & set(context) or max(args.query_views) >= ds.views):
        raise UserError(f"--query_views {' '.join(map(str, args.query_views))}: need views of 0..{ds.views - 1} "
                        f"that are not context views ({' '.join(map(str, context))})")
    pitch = None if args.pitch is None else math.radians(args.pitch)
    queries = query_poses(args, cameras)
    panels = novel_views(model, frames, cameras, context, args.views, args.seed, size, pitch, samples=args.samples,
                         queries=queries, held=args.query_views)
    try:
        save_panels(args.out, panels, args.scale)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {args.out}: scene {args.scene}, context views {[int(i) for i in context]}, "
          f"{panels['ring'].shape[1]} {'chosen' if queries is not None else 'ring'} viewpoints, "
          f"{len(panels['truth'])} views with ground truth, {args.samples} sample(s) of z a view")


def main(argv=None):
    cli.main(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
