"""Render novel views of one scene with a trained GQN (Eslami et al. 2018, figure 1 and the rendering figures).

The model sees K context views of the scene (gqn_dataset.fixed_views, as evaluate.py) and its generation
core (figure S2, z from the prior) renders:
  - a ring of new viewpoints around the scene: cameras built as in DeepMind's data, looking at the scene's
    centre from distance `dist`, view direction d = (cos p cos y, -cos p sin y, sin p), position -dist * d,
    with the distance and pitch taken from the scene's own cameras and the yaw starting at the first
    context view's;
  - the scene's own remaining views, beside their ground truth.

A .png is one grid (rows: context, novel views, truth, model); a .gif plays the ring and then the held-out
views, each frame showing the context, the model's view and the truth (blank on the ring, where there is none).

    python render.py --checkpoint runs/default/checkpoints/latest.pt --data_dir data/shepard_metzler_5_parts/test --scene 0 --out scene0.png
"""
import argparse
import math
import os
import sys
import io

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from evaluate import UserError, input_size, load_model, open_device, resize
from gqn_dataset import DatasetError, open_split

GAP = 2  # pixels between tiles (before --scale)
LABEL = 72  # width of the PNG's label column (before --scale)
BACKGROUND = (255, 255, 255)
BLANK = (200, 200, 200)


def angles(cameras):
    """cameras (..., 7) in DeepMind's order -> yaw, pitch (...) in radians."""
    return torch.atan2(cameras[..., 3], cameras[..., 4]), torch.atan2(cameras[..., 5], cameras[..., 6])


def camera(dist, yaw, pitch):
    """Viewpoints (N, 7) looking at the origin from distance dist, as DeepMind's data places its cameras."""
    yaw, pitch = torch.as_tensor(yaw, dtype=torch.float32), torch.as_tensor(pitch, dtype=torch.float32)
    pitch = pitch.expand_as(yaw)
    d = torch.stack([pitch.cos() * yaw.cos(), -pitch.cos() * yaw.sin(), pitch.sin()], -1)
    return torch.cat([-dist * d, torch.stack([yaw.sin(), yaw.cos(), pitch.sin(), pitch.cos()], -1)], -1)


def ring(cameras, n, yaw0=None, pitch=None):
    """n viewpoints evenly spaced in yaw around the scene whose views sit at `cameras` (S, 7)."""
    yaw, p = angles(cameras)
    dist = cameras[:, :3].norm(dim=-1).mean()
    yaw0 = yaw[0] if yaw0 is None else torch.as_tensor(yaw0)
    pitch = p.mean() if pitch is None else torch.as_tensor(pitch, dtype=torch.float32)
    return camera(dist, yaw0 + torch.arange(n) * (2 * math.pi / n), pitch)


@torch.no_grad()
def novel_views(model, frames, cameras, context, n_ring=12, seed=0, size=None, pitch=None, batch_size=32):
    """One scene's panels as float (N, 3, H, W) in [0, 1].

    frames uint8 (S, 3, H, W) and cameras (S, 7): all of the scene's views; context: indices of the K
    views the model sees. Returns dict(context, ring, truth, model): the context views, the model's views
    around the ring, and the scene's other views with the model's views from the same cameras.
    """
    device = next(model.parameters()).device
    size = size or model.config["image_size"]
    context = [int(i) for i in context]
    held = [i for i in range(frames.shape[0]) if i not in context]
    x = resize(frames[context], size) / 255  # (K, 3, H, W)
    v = cameras[context]
    v_q = torch.cat([ring(cameras, n_ring, yaw0=angles(v[0])[0], pitch=pitch), cameras[held]])
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for chunk in v_q.split(batch_size):
        b = chunk.shape[0]
        out.append(model.generate(x.expand(b, *x.shape).to(device), v.expand(b, *v.shape).to(device),
                                  chunk.to(device), generator=g).clamp(0, 1).cpu())
    out = torch.cat(out)
    return {"context": x, "ring": out[:n_ring], "truth": resize(frames[held], size) / 255,
            "model": out[n_ring:]}


def to_pil(img, scale):
    """float (3, H, W) in [0, 1] -> PIL image, enlarged scale times with nearest neighbour (keeps pixels crisp)."""
    a = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(a)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def font(px):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_px(tile):
    """Font size for labels above a tile of `tile` pixels: small enough that "model" fits over it."""
    return max(9, min(22, tile // 6))


def grid(panels, scale=1):
    """The PNG: one labelled row per panel (context, novel views, truth, model) -> PIL image."""
    rows = [("context", panels["context"]), ("novel views", panels["ring"]),
            ("truth", panels["truth"]), ("model", panels["model"])]
    rows = [(name, imgs) for name, imgs in rows if len(imgs)]
    tile = panels["context"].shape[-1] * scale
    gap, label = GAP * scale, LABEL * scale
    cols = max(len(imgs) for _, imgs in rows)
    im = Image.new("RGB", (label + cols * (tile + gap), len(rows) * (tile + gap) + gap), BACKGROUND)
    draw, f = ImageDraw.Draw(im), font(11 * scale)
    for r, (name, imgs) in enumerate(rows):
        y = gap + r * (tile + gap)
        draw.text((4 * scale, y + tile // 2), name, fill=(0, 0, 0), font=f, anchor="lm")
        for c, img in enumerate(imgs):
            im.paste(to_pil(img, scale), (label + c * (tile + gap), y))
    return im


def frames_gif(panels, scale=2):
    """The GIF's frames: the ring, then the held-out views; each [context | model | truth] -> list of PIL images."""
    k = len(panels["context"])
    tile = panels["context"].shape[-1] * scale
    gap, px = GAP * scale, label_px(tile)
    head = px + 6
    w = (k + 2) * (tile + gap) + 3 * gap
    f = font(px)
    blank = Image.new("RGB", (tile, tile), BLANK)
    truth = [None] * len(panels["ring"]) + list(panels["truth"])
    out = []
    for i, pred in enumerate(list(panels["ring"]) + list(panels["model"])):
        im = Image.new("RGB", (w, head + tile + gap), BACKGROUND)
        draw = ImageDraw.Draw(im)
        for c, img in enumerate(panels["context"]):
            im.paste(to_pil(img, scale), (gap + c * (tile + gap), head))
        xm = 3 * gap + k * (tile + gap)  # a wider gap sets the context apart
        im.paste(to_pil(pred, scale), (xm, head))
        im.paste(blank if truth[i] is None else to_pil(truth[i], scale), (xm + tile + gap, head))
        draw.text((gap, head // 2), "context", fill=(0, 0, 0), font=f, anchor="lm")
        draw.text((xm, head // 2), "model", fill=(0, 0, 0), font=f, anchor="lm")
        draw.text((xm + tile + gap, head // 2), "truth" if truth[i] is not None else "(novel)",
                  fill=(0, 0, 0), font=f, anchor="lm")
        out.append(im)
    return out


def save(path, panels, scale):
    """Write the .png grid or the .gif animation atomically (checkpoint.atomic_write)."""
    from checkpoint import atomic_write

    buf = io.BytesIO()
    if os.path.splitext(path)[1].lower() == ".png":
        grid(panels, scale).save(buf, format="PNG", optimize=True)
    else:
        frames = frames_gif(panels, scale)
        n_ring = len(panels["ring"])
        # Hold the held-out views longer than the ring: they are the ones to compare with the truth.
        durations = [150] * n_ring + [600] * (len(frames) - n_ring)
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
                       loop=0, disposal=1)
    try:
        atomic_write(path, buf.getvalue())
    except OSError as e:
        raise UserError(f"--out {path}: cannot write ({e.strerror or e})") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (e.g. <run>/checkpoints/latest.pt)")
    p.add_argument("--data_dir", required=True, help="converted split folder holding the scene")
    p.add_argument("--scene", type=int, default=0, help="scene index within the split")
    p.add_argument("--out", required=True, help="output .png (grid) or .gif (animation)")
    p.add_argument("--context", type=int, default=3, help="context views the model sees (K)")
    p.add_argument("--views", type=int, default=12, help="novel viewpoints around the ring")
    p.add_argument("--pitch", type=float, default=None,
                   help="ring pitch in degrees (default: the mean pitch of the scene's cameras)")
    p.add_argument("--scale", type=int, default=2, help="enlarge each view this many times (nearest neighbour)")
    p.add_argument("--seed", type=int, default=0, help="chooses the context views (as evaluate.py) and z")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if os.path.splitext(args.out)[1].lower() not in (".png", ".gif"):
        p.error(f"--out {args.out}: must end in .png or .gif")
    for flag in ("views", "scale"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    return args


def run(args):
    from gqn_dataset import DatasetError, fixed_views

    device = open_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    ds = open_split(args.data_dir, "--data_dir")
    size = input_size(ckpt, ds, args.data_dir, "--data_dir")
    if not 0 <= args.scene < len(ds):
        raise UserError(f"--scene {args.scene}: {args.data_dir} has scenes 0..{len(ds) - 1}")
    if not 1 <= args.context <= ds.views - 1:
        raise UserError(f"--context {args.context}: must be between 1 and {ds.views - 1} "
                        f"(the data has {ds.views} views per scene)")
    try:
        frames, cameras = ds[args.scene]
    except DatasetError as e:
        raise UserError(f"--data_dir {e}") from None
    context, _ = fixed_views(args.seed, args.scene, ds.views, args.context)
    pitch = None if args.pitch is None else math.radians(args.pitch)
    panels = novel_views(model, frames, cameras, context, args.views, args.seed, size, pitch)
    save(args.out, panels, args.scale)
    print(f"wrote {args.out}: scene {args.scene}, context views {[int(i) for i in context]}, "
          f"{args.views} novel viewpoints, {len(panels['truth'])} views with ground truth")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (UserError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
