"""Render novel views of one scene with a trained GQN (Eslami et al. 2018, figure 1 and the rendering figures).

The model sees K context views of the scene (gqn_dataset.fixed_views, as evaluate.py) and its generation
core (figure S2, z from the prior) renders:
  - a ring of new viewpoints around the scene (cameras.ring: DeepMind's look-at cameras at the scene's own
    distance and pitch, the yaw starting at the first context view's);
  - the scene's own remaining views, beside their ground truth.

A .png is one grid (rows: context, novel views, truth, model); a .gif plays the ring and then the held-out
views, each frame showing the context, the model's view and the truth (blank on the ring, where there is none).
The pictures are drawn by pictures.py, which train.py and evaluate.py share.

    python render.py --checkpoint runs/default/checkpoints/latest.pt --data_dir data/shepard_metzler_5_parts/test --scene 0 --out scene0.png
"""
import math
import os

import torch

import cli
from checkpoint import input_size, load_model
from cli import UserError
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
    a("--views", type=cli.positive_int, default=12, help="novel viewpoints around the ring (default 12)")
    a("--pitch", type=float, default=None,
      help="ring pitch in degrees (default: the mean pitch of the scene's cameras)")
    a("--scale", type=cli.positive_int, default=2,
      help="enlarge each view this many times, nearest neighbour (default 2)")
    a("--seed", type=cli.nonneg_int, default=0, help="chooses the context views (as evaluate.py) and z (default 0)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cpu, cuda or cuda:N (default: cuda when present)")
    args = p.parse_args(argv)
    if os.path.splitext(args.out)[1].lower() not in (".png", ".gif"):
        raise UserError(f"--out {args.out}: must end in .png or .gif")
    return args


def run(args):
    device = cli.open_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    ds = open_split(args.data_dir, "--data_dir")
    size = input_size(ckpt, ds, args.data_dir, "--data_dir")
    if not args.scene < len(ds):
        raise UserError(f"--scene {args.scene}: {args.data_dir} has scenes 0..{len(ds) - 1}")
    if not args.context <= ds.views - 1:
        raise UserError(f"--context {args.context}: must be between 1 and {ds.views - 1} "
                        f"(the data has {ds.views} views per scene)")
    try:
        frames, cameras = ds[args.scene]
    except DatasetError as e:
        raise UserError(f"--data_dir {e}") from None
    context, _ = fixed_views(args.seed, args.scene, ds.views, args.context)
    pitch = None if args.pitch is None else math.radians(args.pitch)
    panels = novel_views(model, frames, cameras, context, args.views, args.seed, size, pitch)
    try:
        save_panels(args.out, panels, args.scale)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    print(f"wrote {args.out}: scene {args.scene}, context views {[int(i) for i in context]}, "
          f"{args.views} novel viewpoints, {len(panels['truth'])} views with ground truth")


def main(argv=None):
    cli.main(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    main()
