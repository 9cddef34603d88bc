"""Render the built-in Shepard-Metzler data set straight into the converted format (gqn_dataset.py).

Follows the Shepard-Metzler objects data set of Eslami et al. 2018 (supplementary material, "Shepard-Metzler
objects"; DeepMind's gqn-datasets `shepard_metzler_5_parts` / `_7_parts`): an object of `parts` equal cubes,
each a random colour, joined face to face along a random self-avoiding walk on the grid, centred at the origin,
seen by 15 cameras on a sphere around it, 64x64 JPEG frames on a black background.

Conventions fitted to two real scenes of DeepMind's data (../shared/fixtures): the real objects' cubes were
recovered by matching silhouettes over all 15 views (both scenes agree on every choice below):
- camera 10/3 from the object's centre, looking at it along d = (cos p cos y, -cos p sin y, sin p), placed at
  -(10/3) d; world z is image up, image x is not mirrored; yaw a multiple of pi/50, pitch of pi/100 in
  [-43, 48] pi/100 (the range [-1.35, 1.51] of the real data);
- the object is centred on its bounding box; a cube's side is tan(10 deg) = 0.176 scene units, at a 20 degree
  field of view (perspective is weak; 15-25 degrees fit the real silhouettes equally well);
- shading (least squares on the real frames' face colours): a light fixed in the world from about (1, 1, 1)
  lights +x/+y/+z faces, adds a little white to them and casts shadows; a camera headlight and an ambient term
  light every face; colours are saturated random hues;
- JPEG quality 95 with 4:2:0 chroma subsampling (the real frames' quantisation tables; gqn_dataset.encode_jpeg).
Side by side with the real frames (same cameras): the real object re-rendered matches them closely.
The shards record this camera model (camera_model): fov 20 degrees, depths 10/3 -+ 0.63 (volume.py reads them).

Usage:
    python dataset/shepard_metzler.py --out data/builtin/shepard_metzler_7_parts --train_scenes 20000 --test_scenes 2000
"""
import math
from dataclasses import dataclass

import numpy as np

if not __package__:  # `python dataset/shepard_metzler.py`: the repository's modules, one folder up
    import _repo  # noqa: F401
import cameras  # noqa: E402
from cli import UserError, main as cli_main, positive_int  # noqa: E402
from dataset import builtin  # noqa: E402
from dataset.builtin import _is_int  # noqa: E402
from gqn_format import encode_jpeg  # noqa: E402

IMAGE_SIZE = 64
VIEWS = 15
DISTANCE = 10.0 / 3.0          # camera to object centre, as in DeepMind's cameras
FOV = math.radians(20.0)       # full field of view (square image)
CUBE = math.tan(FOV / 2)       # cube side in world units: fitted to the real frames' object size
PITCH_STEPS = (-43, 48)        # pitch = k * pi/100, k uniform in this range (inclusive)
YAW_STEPS = 100                # yaw = k * 2pi/100, k uniform in [0, 100)
SUPERSAMPLE = 2                # antialiasing: 2x2 rays a pixel on edges, averaged
MAX_PARTS = 20                 # beyond this the object no longer fits the frame
# Shading, least-squares fit to the real frames' face colours (Lambertian terms, clipped to [0, 1]):
# colour * (AMBIENT + HEADLIGHT * n.v + SUN * max(n.l, 0)) + WHITE * max(n.l, 0)
AMBIENT, HEADLIGHT, SUN, WHITE = 0.33, 0.35, 0.59, 0.19
LIGHT = np.array([0.63, 0.59, 0.51]) / np.linalg.norm([0.63, 0.59, 0.51])
# Self-avoiding walk steps: the six face neighbours on the grid.
STEPS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def camera_model(parts):
    """The camera model the shards record (gqn_dataset.camera_model): FOV, and the depths the object can occupy.

    An object of P cubes lies within CUBE/2 * sqrt(P^2 + 2) of its centre (the half-diagonal of P cubes in a row,
    the longest bounding box); with P at least 7, DeepMind's larger data set, both data sets get 10/3 -+ 0.63.
    """
    radius = CUBE / 2 * math.sqrt(max(parts, 7) ** 2 + 2)
    return dict(fov=math.degrees(FOV), near=DISTANCE - radius, far=DISTANCE + radius)


def dataset_name(parts):
    return f"shepard_metzler_{parts}_parts"


def random_walk(rng, parts):
    """Grid cells (int [parts, 3]) of a self-avoiding walk: each step to a random free face neighbour."""
    while True:  # a walk can trap itself (rare below ~20 parts); start over then
        cells = [(0, 0, 0)]
        occupied = {cells[0]}
        for _ in range(parts - 1):
            free = [c for c in (tuple(int(v) for v in np.add(cells[-1], s)) for s in STEPS) if c not in occupied]
            if not free:
                break
            cells.append(free[rng.integers(len(free))])
            occupied.add(cells[-1])
        if len(cells) == parts:
            return np.array(cells, dtype=np.int64)


def random_colours(rng, parts):
    """Saturated random hues (HSV: h uniform, s in [0.9, 1], v in [0.8, 1]) as RGB in [0, 1], [parts, 3]."""
    h, s, v = rng.random(parts), rng.uniform(0.9, 1.0, parts), rng.uniform(0.8, 1.0, parts)
    k = (np.array([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6  # vectorised HSV -> RGB
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def random_object(rng, parts):
    """(centres float [parts, 3] in world units, colours [parts, 3]); centred on the bounding box like the real data."""
    cells = random_walk(rng, parts).astype(np.float64)
    centres = (cells - (cells.min(0) + cells.max(0)) / 2) * CUBE
    return centres, random_colours(rng, parts)


def random_cameras(rng, views=VIEWS):
    """float32 [views, 5] (x, y, z, yaw, pitch): on the sphere of radius 10/3, looking at the origin."""
    yaw = rng.integers(0, YAW_STEPS, views) * (2 * math.pi / YAW_STEPS)
    pitch = rng.integers(PITCH_STEPS[0], PITCH_STEPS[1] + 1, views) * (math.pi / 100)
    position = -DISTANCE * cameras.direction(yaw, pitch)
    return np.concatenate([position, yaw[:, None], pitch[:, None]], axis=1).astype(np.float32)


def _slab(origins, dirs, lo, hi):
    """Slab test of rays (origins, dirs float32 [3, N]) against boxes lo, hi [C, 3].

    Returns (t_enter [C, N], t_exit [C, N], per-axis entry [3 x (C, N)]), in units of each ray's length.
    """
    t_near, t_enter, t_exit = [], None, None
    for a in range(3):
        inv = 1.0 / dirs[a]
        o_inv = origins[a] * inv
        t1 = lo[:, a, None].astype(np.float32) * inv - o_inv               # (C, N)
        t2 = hi[:, a, None].astype(np.float32) * inv - o_inv
        near = np.minimum(t1, t2)
        far = np.maximum(t1, t2, out=t1)
        t_near.append(near)
        t_enter = near.copy() if t_enter is None else np.maximum(t_enter, near, out=t_enter)
        t_exit = far if t_exit is None else np.minimum(t_exit, far, out=t_exit)
    return t_enter, t_exit, t_near


def _trace(o, rays, view, lo, hi):
    """Primary rays from camera centres o [V, 3] along rays [3, N] of views view [N] -> cube, axis, hit, depth."""
    origins = o.T[:, view].astype(np.float32)
    t_enter, t_exit, t_near = _slab(origins, rays, lo, hi)
    # Cameras are outside every cube and nothing is behind them, so a ray hits a cube when entry < exit.
    depth = np.where(t_enter < t_exit, t_enter, np.float32(np.inf))
    cube = depth.argmin(0)                                                 # (N,) nearest cube
    flat = cube * depth.shape[1] + np.arange(depth.shape[1])
    entry = t_enter.ravel()[flat]
    hit = entry < t_exit.ravel()[flat]
    axis = np.where(t_near[0].ravel()[flat] == entry, 0, np.where(t_near[1].ravel()[flat] == entry, 1, 2))
    return cube, axis, hit, entry


def _shadowed(o, rays, view, entry, axis, sign, lo, hi):
    """True where the hit point's ray towards LIGHT is blocked by another cube (the real frames have shadows)."""
    p = o.T[:, view] + entry * rays                                         # (3, N) hit points
    p[axis, np.arange(len(axis))] += 1e-4 * sign                            # step off the face, out of its cube
    dirs = np.broadcast_to(LIGHT[:, None], p.shape).astype(np.float32)    # LIGHT has no zero component
    t_enter, t_exit, _ = _slab(p.astype(np.float32), dirs, lo, hi)
    return ((t_exit > np.maximum(t_enter, 0)) & (t_exit > 0)).any(0)


def _seen(centres, o, d, right, up, f, size):
    """Pixels that can see a cube: inside the bounding box of some cube's 8 projected corners -> (V, size, size)."""
    corners = centres[:, None, :] + CUBE / 2 * np.array(np.meshgrid(*[[-1, 1]] * 3)).reshape(3, 8).T
    q = corners[None] - o[:, None, None]                                    # (V, C, 8, 3)
    z = np.einsum("vcks,vs->vck", q, d)
    col = size / 2 + f * np.einsum("vcks,vs->vck", q, right) / z
    row = size / 2 - f * np.einsum("vcks,vs->vck", q, up) / z
    pix = np.arange(size) + 0.5
    in_cols = (pix >= np.floor(col.min(2))[..., None]) & (pix <= np.ceil(col.max(2))[..., None])  # (V, C, size)
    in_rows = (pix >= np.floor(row.min(2))[..., None]) & (pix <= np.ceil(row.max(2))[..., None])
    return np.einsum("vci,vcj->vij", in_rows.astype(np.float32), in_cols.astype(np.float32)) > 0


def _faces(centres, colours, o, d):
    """Per (view, cube, axis), flattened so that each ray needs one gather per table: the face's colour lit and in
    shadow (N, RGB), whether the sun lights it, and the sign of its normal."""
    sign = np.sign(o[:, None, :] - centres[None])                           # (V, C, 3) normal of the face seen
    n_dot_l = np.maximum(sign * LIGHT, 0)
    n_dot_v = np.maximum(sign * -d[:, None, :], 0)
    lit = colours[None, :, None, :] * (AMBIENT + HEADLIGHT * n_dot_v + SUN * n_dot_l)[..., None] \
        + WHITE * n_dot_l[..., None]
    dark = colours[None, :, None, :] * (AMBIENT + HEADLIGHT * n_dot_v)[..., None]
    lit, dark = np.clip(lit, 0, 1), np.clip(dark, 0, 1)                    # (V, C, 3 axes, RGB)
    return lit.reshape(-1, 3), dark.reshape(-1, 3), (n_dot_l > 0).ravel(), sign.ravel()


def render_views(centres, colours, raw, size=IMAGE_SIZE, supersample=SUPERSAMPLE):
    """Ray-cast axis-aligned cubes of side CUBE: uint8 [V, size, size, 3] for raw cameras [V, 5] (x, y, z, yaw, pitch).

    One ray per pixel, only for pixels inside some cube's projected bounding box, all views and cubes in one
    vectorised slab test; then supersample x supersample rays for pixels on an edge (antialiasing).
    """
    centres = np.asarray(centres, np.float64)
    colours = np.asarray(colours, np.float64)
    yaw, pitch = raw[:, 3].astype(np.float64), raw[:, 4].astype(np.float64)
    d, right, up = cameras.axes(np.sin(yaw), np.cos(yaw), np.sin(pitch), np.cos(pitch))  # (V, 3) each
    o = -DISTANCE * d                                                       # looking at the object's centre
    f = size / 2 / math.tan(FOV / 2)                                        # focal length in pixels
    V, C = len(d), len(centres)
    lo, hi = centres - CUBE / 2, centres + CUBE / 2

    mask = _seen(centres, o, d, right, up, f, size)
    lit, dark, lit_face, normal = _faces(centres, colours, o, d)
    fd, right32, up32 = (f * d).T.astype(np.float32), right.T.astype(np.float32), up.T.astype(np.float32)

    def shade(view, r, c):
        """Colour and face label (-1 = background) of rays through pixel coordinates (r, c) of views `view`."""
        x, y = (c - size / 2).astype(np.float32), (r - size / 2).astype(np.float32)
        rays = np.stack([fd[a][view] + x * right32[a][view] - y * up32[a][view] for a in range(3)])  # (3, N)
        rays[rays == 0] = 1e-9
        cube, axis, hit, entry = _trace(o, rays, view, lo, hi)
        face = (view * C + cube) * 3 + axis
        rgb = np.zeros((len(view), 3))
        k = np.nonzero(hit & lit_face[face])[0]                             # lit faces may lie in a shadow
        shadow = np.zeros(len(view), bool)
        if len(k):
            shadow[k] = _shadowed(o, rays[:, k], view[k], entry[k], axis[k], normal[face[k]], lo, hi)
        h = np.nonzero(hit)[0]
        rgb[h] = np.where(shadow[h, None], dark[face[h]], lit[face[h]])
        return rgb, np.where(hit, cube * 3 + axis, -1)

    # First pass: one ray a pixel, at the first of its supersample x supersample sub-positions.
    sub = (np.arange(supersample) + 0.5) / supersample
    v, r, c = np.nonzero(mask)
    rgb, label = shade(v, r + sub[0], c + sub[0])
    image = np.zeros((V, size, size, 3))
    image[v, r, c] = rgb
    # Antialiasing: a pixel whose 4 neighbours do not all show its face gets the other sub-positions' rays too.
    if supersample > 1:
        labels = np.full((V, size + 2, size + 2), -1)
        labels[v, r + 1, c + 1] = label
        centre = labels[:, 1:-1, 1:-1]
        edge = ((labels[:, :-2, 1:-1] != centre) | (labels[:, 2:, 1:-1] != centre)
                | (labels[:, 1:-1, :-2] != centre) | (labels[:, 1:-1, 2:] != centre)) & mask
        v, r, c = np.nonzero(edge)
        sr, sc = (g.ravel()[1:] for g in np.meshgrid(sub, sub, indexing="ij"))
        k = len(sr)
        rgb, _ = shade(np.repeat(v, k), (r[:, None] + sr).ravel(), (c[:, None] + sc).ravel())
        image[v, r, c] = (image[v, r, c] + rgb.reshape(-1, k, 3).sum(1)) / (k + 1)
    return (image * 255 + 0.5).astype(np.uint8)


def render_scene(seed, split, index, parts=7, views=VIEWS):
    """One scene, a pure function of (seed, split, index): (list of `views` JPEG bytes, cameras float32 [views, 5])."""
    # Seeding per scene makes the output independent of shard size and worker count.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    centres, colours = random_object(rng, parts)
    raw = random_cameras(rng, views)
    images = render_views(centres, colours, raw)
    return [encode_jpeg(im) for im in images], raw


@dataclass(frozen=True)
class ShepardMetzler:
    """The world of objects of `parts` cubes, for dataset/builtin.py."""
    parts: int = 7
    views: int = VIEWS
    image_size: int = IMAGE_SIZE

    @property
    def name(self):
        return dataset_name(self.parts)

    @property
    def describe(self):
        return f"Shepard-Metzler scenes of {self.parts} cubes"

    def seconds(self, scenes, workers):
        """About how long rendering takes on this many cores: 17 ms a scene and core, the AVX2 EPYC's 5500 in 45-50 s
        (the slowest CPU measured, as rooms.py's estimate; 10 ms on the AVX-512 EPYC)."""
        return 0.017 * scenes / workers

    def camera_model(self):
        return camera_model(self.parts)

    def render_scene(self, seed, split, index):
        frames, raw = render_scene(seed, split, index, self.parts, self.views)
        return dict(frames=frames, cameras=raw)


def check_parts(parts):
    if not _is_int(parts) or not 1 <= parts <= MAX_PARTS:
        raise UserError(f"--parts must be an integer in 1..{MAX_PARTS} (larger objects leave the frame), "
                        f"got {parts!r}")


def render_dataset(out, train_scenes, test_scenes, parts=7, seed=0, workers=1, scenes_per_shard=250,
                   overwrite=False, progress=True):
    """Render `train_scenes` and `test_scenes` scenes of `parts` cubes into `out/train` and `out/test` -> the split
    folders (dataset/builtin.py's render_dataset: the same bytes whatever `workers`)."""
    check_parts(parts)
    return builtin.render_dataset(out, ShepardMetzler(int(parts)), train_scenes, test_scenes, seed, workers,
                                  scenes_per_shard, overwrite, progress)


def run(argv):
    p = builtin.render_parser("Render Shepard-Metzler scenes (GQN's built-in data set) into OUT/train and OUT/test "
                              "in the converted format.")
    p.add_argument("--parts", type=positive_int, default=7, help="cubes per object (DeepMind: 5 or 7; default 7)")
    args = p.parse_args(argv)
    check_parts(args.parts)
    builtin.render_command(args, ShepardMetzler(args.parts))


def main(argv=None):
    cli_main(run, argv)


if __name__ == "__main__":
    main()
