"""Pictures of what a GQN sees and renders: one labelled image grid, and the pictures built from it.

- `grid`: rows of tiles with optional row labels and column headings; every picture here is one (TensorBoard's
  test views, samples.png, render.py's PNG and each frame of its GIF).
- `novel_views`: a trained model's generation core (Eslami et al. 2018, figure S2, z from the prior) rendering
  one scene from a ring of new cameras, the scene's own held-out cameras or cameras of the user's choosing, as in
  the paper's figures; several samples of z per view and their per-pixel spread show what the model is unsure of.
- `save_samples`, `save_panels`: samples.png at the end of training; render.py's .png grid or .gif animation.

Written atomically (files.atomic_write). Images are float (3, H, W) in [0, 1] throughout.
"""
import io
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cameras import angles, ring
from files import atomic_write
from gqn_dataset import resize

GAP = 2  # pixels between tiles (before scale)
LABEL_FONT = 9  # row labels' font size (before scale); the label column is as wide as the longest label
BACKGROUND = (255, 255, 255)
BLANK = (200, 200, 200)  # a tile with nothing to show (a novel view has no ground truth)
SPREAD_WHITE = 0.25  # a spread or an error (0-1 scale) drawn white: half the largest standard deviation in [0, 1]


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


def label_width(labels, scale=1):
    """Pixels of a label column that holds every one of `labels`."""
    return int(max(font(LABEL_FONT * scale).getlength(t) for t in labels)) + 8 * scale


def grid(rows, scale=1, headings=None, split=None, labels_px=None):
    """rows [(label, [image or None, ...])] -> PIL image of the tiles, row by row.

    A label column when any row has a label (labels_px wide, default: its longest label's width); headings
    [(column, text)] on a line above the tiles; split: a wider gap after this column (to set the context views
    apart). None is a blank tile.
    """
    tile = next(img for _, imgs in rows for img in imgs if img is not None).shape[-1] * scale
    gap = GAP * scale
    labels = [label for label, _ in rows if label]
    left = (labels_px or label_width(labels, scale)) if labels else gap
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
            draw.text((4 * scale, y + tile // 2), label, fill=(0, 0, 0), font=font(LABEL_FONT * scale), anchor="lm")
        for c, img in enumerate(imgs):
            im.paste(Image.new("RGB", (tile, tile), BLANK) if img is None else to_pil(img, scale), (x(c), y))
    return im


def stack(images, gap):
    """PIL images one under the other, left-aligned, `gap` pixels apart -> one PIL image."""
    im = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)),
                   BACKGROUND)
    y = 0
    for i in images:
        im.paste(i, (0, y))
        y += i.height + gap
    return im


def magnitude(t):
    """Per-pixel magnitudes (Q, H, W) on the 0-1 scale -> grey images (Q, 3, H, W), SPREAD_WHITE and above white."""
    return (t / SPREAD_WHITE).clamp(0, 1)[:, None].expand(-1, 3, -1, -1)


def spread(samples):
    """(N, Q, 3, H, W) draws -> (Q, 3, H, W) grey image of their per-pixel standard deviation (RMS over colours,
    as metrics.draw_scores): where the model is unsure what it sees."""
    return magnitude(samples.float().var(0, correction=0).mean(1).sqrt())


def error(pred, truth):
    """(Q, 3, H, W) prediction and truth -> grey image of the per-pixel error (RMS over colours), drawn as spread()
    draws the spread: beside it, where the model is wrong and whether it knew."""
    return magnitude((pred.float() - truth.float()).pow(2).mean(1).sqrt())


def draw_columns(draws, truth):
    """A scene's draws (N, 3, H, W) of one query view and its truth -> tiles: each draw, their spread and the
    error of their mean."""
    return [*draws, spread(draws[:, None])[0], error(draws.mean(0, keepdim=True), truth[None])[0]]


def test_views_grid(x, truth, reconstruction, generations):
    """TensorBoard's test picture, a row a scene: its context views x (B, K, 3, H, W), the true query view, the
    reconstruction (z from the posterior), generations (N, B, 3, H, W) (z from the prior), their spread and the
    error of their mean (where the draws differ, the model is unsure; where the error is, it should be), tiles of at
    least 96 px -> HWC uint8 array (writer.add_image, dataformats "HWC")."""
    k, n = x.shape[1], len(generations)
    rows = [("", [*x[b], truth[b], reconstruction[b], *draw_columns(generations[:, b], truth[b])])
            for b in range(len(truth))]
    headings = [(0, "context"), (k, "truth"), (k + 1, "posterior"), (k + 2, "prior samples"), (k + 2 + n, "spread"),
                (k + 3 + n, "error")]
    return np.asarray(grid(rows, max(1, 96 // x.shape[-1]), headings, split=k - 1))


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_samples(path, context, truth, draws):
    """samples.png: per scene its context views (B, K, 3, H, W), the true query view, N draws of it (N, B, 3, H, W),
    their spread and the error of their mean."""
    k, n = context.shape[1], len(draws)
    scale = max(1, 96 // context.shape[-1])
    rows = [("", [*context[i], truth[i], *draw_columns(draws[:, i], truth[i])]) for i in range(len(truth))]
    headings = [(0, "context views"), (k, "truth"), (k + 1, f"{n} draws of z" if n > 1 else "generated")]
    if n > 1:
        headings += [(k + 1 + n, "spread"), (k + 2 + n, "error")]
    atomic_write(path, png_bytes(grid(rows, scale, headings, split=k - 1)))


# ------------------------------------------------------------------------------------------------ novel views

@torch.no_grad()
def sample_views(model, x, v, v_q, samples=1, seed=0, batch_size=32):
    """One scene's context x (K, 3, H, W) in [0, 1] and poses v (K, 7), query poses v_q (Q, 7) -> `samples` draws of z
    from the prior per view: (samples, Q, 3, H, W) in [0, 1], on the CPU. The same seed gives the same pictures."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(samples):
        views = []
        for chunk in v_q.split(batch_size):
            b = chunk.shape[0]
            views.append(model.generate(x.expand(b, *x.shape).to(device), v.expand(b, *v.shape).to(device),
                                        chunk.to(device), generator=g).clamp(0, 1).cpu())
        out.append(torch.cat(views))
    return torch.stack(out)


@torch.no_grad()
def novel_views(model, frames, cameras, context, n_ring=12, seed=0, size=None, pitch=None, batch_size=32,
                samples=1, queries=None, held=None):
    """One scene's panels, images float in [0, 1].

    frames uint8 (S, 3, H, W) and cameras (S, 7): all of the scene's views; context: indices of the K views the
    model sees. Returns dict(context (K, 3, H, W), ring, model (samples, Q, 3, H, W), truth (Q, 3, H, W),
    context_ids, held_ids, ring_cameras (Q, 7)): the model's views around a ring of new cameras (cameras.ring: the
    scene's distance and pitch, or `pitch`, starting at the first context view's yaw), and the scene's other views
    (held_ids) with the model's views from the same cameras. With `queries` (Q, 7), the model's views from those
    poses instead (in "ring"; no truth, no held-out views). `held`: which of the other views (default: all).
    """
    size = size or model.config["image_size"]
    context = [int(i) for i in context]
    if queries is not None:
        held = []
    elif held is None:
        held = [i for i in range(frames.shape[0]) if i not in context]
    x = resize(frames[context], size) / 255  # (K, 3, H, W)
    v = cameras[context]
    if queries is not None:
        new = queries
    else:
        new = ring(cameras, n_ring, yaw0=angles(v[0])[0], pitch=pitch) if n_ring else cameras[:0]
    out = sample_views(model, x, v, torch.cat([new, cameras[held]]), samples, seed, batch_size)
    return {"context": x, "ring": out[:, :len(new)], "truth": resize(frames[held], size) / 255,
            "model": out[:, len(new):], "context_ids": context, "held_ids": held, "ring_cameras": new}


def draw_rows(name, views, truth=None):
    """Grid rows of (samples, Q, 3, H, W) views: one row `name` for one sample; else a row a draw of z, their spread
    and, given the truth (Q, 3, H, W), the error of their mean."""
    if len(views) == 1:
        return [(name, list(views[0]))]
    rows = [(f"draw {k + 1}", list(views[k])) for k in range(len(views))] + [("spread", list(spread(views)))]
    if truth is not None:
        rows.append(("error", list(error(views.mean(0), truth))))
    return rows


def panel_blocks(panels):
    """The PNG's three blocks, each (headings, rows): the context views, the new cameras (each headed by its yaw, and
    its pitch where they differ), the held-out views with their truth; the views are headed by their index."""
    yaw, pitch = (torch.rad2deg(a).round().int().tolist() for a in angles(panels["ring_cameras"]))
    one_pitch = len(set(pitch)) == 1
    cams = [f"yaw {y}°" if one_pitch else f"{y}°, {p}°" for y, p in zip(yaw, pitch)]
    blocks = [([(i, f"view {j}") for i, j in enumerate(panels["context_ids"])], [("context", list(panels["context"]))])]
    if panels["ring"].shape[1]:
        blocks.append((list(enumerate(cams)), draw_rows("new cameras", panels["ring"])))
    if len(panels["truth"]):
        blocks.append(([(i, f"view {j}") for i, j in enumerate(panels["held_ids"])],
                       [("truth", list(panels["truth"]))] + draw_rows("model", panels["model"], panels["truth"])))
    return blocks


def panels_grid(panels, scale=1):
    """The PNG of novel_views: panel_blocks, one under the other, with one label column."""
    blocks = panel_blocks(panels)
    width = label_width([label for _, rows in blocks for label, _ in rows], scale)  # the tiles of all blocks align
    return stack([grid(rows, scale, headings, labels_px=width) for headings, rows in blocks], 4 * GAP * scale)


def panels_frames(panels, scale=2):
    """The GIF's frames: the ring, then the held-out views; each [context | model | truth] -> list of PIL images."""
    k = len(panels["context"])
    truth = [None] * panels["ring"].shape[1] + list(panels["truth"])
    return [grid([("", [*panels["context"], pred, truth[i]])], scale,
                 [(0, "context"), (k, "model"), (k + 1, "truth" if truth[i] is not None else "(novel)")],
                 split=k - 1)
            for i, pred in enumerate(list(panels["ring"][0]) + list(panels["model"][0]))]


def panels_bytes(panels, scale, gif=False):
    """novel_views as the bytes of a .png grid, or of a .gif animation with gif=True (render.py's files; view.py's
    downloads)."""
    if not gif:
        return png_bytes(panels_grid(panels, scale))
    frames = panels_frames(panels, scale)
    n_ring = panels["ring"].shape[1]
    # Hold the held-out views longer than the ring: they are the ones to compare with the truth.
    durations = [150] * n_ring + [600] * (len(frames) - n_ring)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   disposal=1)
    return buf.getvalue()


def save_panels(path, panels, scale):
    """Write novel_views as a .png grid or a .gif animation, chosen by the file name."""
    atomic_write(path, panels_bytes(panels, scale, gif=os.path.splitext(path)[1].lower() != ".png"))
