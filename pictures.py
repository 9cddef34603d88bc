"""Pictures of what a GQN sees and renders: one labelled image grid, and the pictures built from it.

- `grid`: rows of tiles with optional row labels and column headings; every picture here is one (the
  TensorBoard grids, samples.png, render.py's PNG and each frame of its GIF).
- `novel_views`: a trained model's generation core (Eslami et al. 2018, figure S2, z from the prior) rendering
  one scene from a ring of new cameras and from the scene's own held-out cameras, as in the paper's figures.
- `save_samples`, `save_panels`: samples.png at the end of training; render.py's .png grid or .gif animation.

Written atomically (checkpoint.atomic_write). Images are float (3, H, W) in [0, 1] throughout.
"""
import io
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cameras import angles, ring
from checkpoint import atomic_write
from gqn_dataset import resize

GAP = 2  # pixels between tiles (before scale)
LABEL = 72  # width of the row-label column (before scale)
BACKGROUND = (255, 255, 255)
BLANK = (200, 200, 200)  # a tile with nothing to show (a novel view has no ground truth)


def to_pil(img, scale=1):
    """float (3, H, W) in [0, 1] -> PIL image, enlarged scale times with nearest neighbour (keeps pixels crisp)."""
    a = (img.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(a)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def font(px):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_px(tile):
    """Font size for headings over a tile of `tile` pixels: small enough that "model" fits over it."""
    return max(9, min(22, tile // 6))


def grid(rows, scale=1, headings=None, split=None):
    """rows [(label, [image or None, ...])] -> PIL image of the tiles, row by row.

    A label column when any row has a label; headings [(column, text)] on a line above the tiles; split: a
    wider gap after this column (to set the context views apart). None is a blank tile.
    """
    tile = next(img for _, imgs in rows for img in imgs if img is not None).shape[-1] * scale
    gap = GAP * scale
    left = LABEL * scale if any(label for label, _ in rows) else gap
    top = label_px(tile) + 6 if headings else gap
    extra = 2 * gap if split is not None else 0
    cols = max(len(imgs) for _, imgs in rows)
    im = Image.new("RGB", (left + cols * (tile + gap) + extra, top + len(rows) * (tile + gap)), BACKGROUND)
    draw = ImageDraw.Draw(im)

    def x(c):
        return left + c * (tile + gap) + (extra if split is not None and c > split else 0)

    for c, text in headings or []:
        draw.text((x(c), top // 2), text, fill=(0, 0, 0), font=font(label_px(tile)), anchor="lm")
    for r, (label, imgs) in enumerate(rows):
        y = top + r * (tile + gap)
        if label:
            draw.text((4 * scale, y + tile // 2), label, fill=(0, 0, 0), font=font(11 * scale), anchor="lm")
        for c, img in enumerate(imgs):
            im.paste(Image.new("RGB", (tile, tile), BLANK) if img is None else to_pil(img, scale), (x(c), y))
    return im


def tensorboard_grid(images, per_row=8):
    """(N, 3, H, W) in [0, 1] -> HWC uint8 array of `per_row` tiles a row on white (writer.add_image, "HWC")."""
    images = list(images)
    return np.asarray(grid([("", images[i:i + per_row]) for i in range(0, len(images), per_row)]))


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_samples(path, context, truth, generated):
    """samples.png: per scene its context views (N, K, 3, H, W), the true query view and the generated one."""
    k = context.shape[1]
    scale = max(1, 96 // context.shape[-1])
    rows = [("", [*context[i], truth[i], generated[i]]) for i in range(len(truth))]
    atomic_write(path, png_bytes(grid(rows, scale, [(0, "context views"), (k, "ground truth"),
                                                     (k + 1, "generated")], split=k - 1)))


# ------------------------------------------------------------------------------------------------ novel views

@torch.no_grad()
def novel_views(model, frames, cameras, context, n_ring=12, seed=0, size=None, pitch=None, batch_size=32):
    """One scene's panels as float (N, 3, H, W) in [0, 1].

    frames uint8 (S, 3, H, W) and cameras (S, 7): all of the scene's views; context: indices of the K
    views the model sees. Returns dict(context, ring, truth, model): the context views, the model's views
    around a ring of new cameras (cameras.ring: the scene's distance and pitch, or `pitch`, starting at the
    first context view's yaw), and the scene's other views with the model's views from the same cameras.
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


def panels_grid(panels, scale=1):
    """The PNG of novel_views: labelled rows context, novel views, truth, model."""
    rows = [("context", panels["context"]), ("novel views", panels["ring"]),
            ("truth", panels["truth"]), ("model", panels["model"])]
    return grid([(name, list(imgs)) for name, imgs in rows if len(imgs)], scale)


def panels_frames(panels, scale=2):
    """The GIF's frames: the ring, then the held-out views; each [context | model | truth] -> list of PIL images."""
    k = len(panels["context"])
    truth = [None] * len(panels["ring"]) + list(panels["truth"])
    return [grid([("", [*panels["context"], pred, truth[i]])], scale,
                 [(0, "context"), (k, "model"), (k + 1, "truth" if truth[i] is not None else "(novel)")],
                 split=k - 1)
            for i, pred in enumerate(list(panels["ring"]) + list(panels["model"]))]


def save_panels(path, panels, scale):
    """Write novel_views as a .png grid or a .gif animation, chosen by the file name."""
    if os.path.splitext(path)[1].lower() == ".png":
        atomic_write(path, png_bytes(panels_grid(panels, scale)))
        return
    frames = panels_frames(panels, scale)
    n_ring = len(panels["ring"])
    # Hold the held-out views longer than the ring: they are the ones to compare with the truth.
    durations = [150] * n_ring + [600] * (len(frames) - n_ring)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   disposal=1)
    atomic_write(path, buf.getvalue())
