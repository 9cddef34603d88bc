"""Render look-alikes of DeepMind's rooms_ring_camera scenes straight into the converted format (gqn_format.py).

Follows the rooms data set of Eslami et al. 2018 (the paper's main figure; gqn-datasets' README): a square room of
7x7 units with textured walls in one of five colours (red, green, cerise, orange, yellow) and a textured floor in
one of three (yellow, white, blue), sky above the low walls, 1 to 3 objects of 7 shapes (box, sphere, cylinder,
capsule, cone, icosahedron, triangle) in saturated colours standing on the floor, a light whose direction changes
from scene to scene and casts shadows, and 10 cameras on a ring inside the room, each looking at the room's centre,
64x64 JPEG frames. Cameras are DeepMind's five numbers (x, y, z, yaw, pitch), mapped to the 7-d pose (cameras.py).

DeepMind never published the ring's radius and height nor the field of view, and no real frame of rooms_ring_camera
is available to this project, so they are not fitted to data as dataset/shepard_metzler.py's cameras are. They were
chosen so that a view has the layout of the paper's rooms and of the public re-renderers (musyoku's
gqn-dataset-renderer: a 45-degree vertical field of view, objects on a 3x3 grid of spacing 1.5 with a jitter of
0.3, sky colour (153, 226, 249)): the camera on a ring of radius RING at height HEIGHT looks at the floor's centre,
the far wall fills the middle of the frame, about a fifth of it is sky and the floor the lower half.

Every scene also records what its objects change: the view rendered with the objects removed (the empty room,
JPEG) and a mask of the pixels where the objects or their shadows are (gqn_format's optional "empty" and "masks"),
from which evaluate.py scores a model on the objects alone: an empty room scores 1, the truth 0.

The renderer casts one ray a pixel in numpy (and a second on edges), all views of a scene at once: the room's
planes, objects as convex polyhedra (box, icosahedron, triangle) or quadrics (sphere, cylinder, capsule, cone), and
a shadow ray to the light from every point that faces it over the walls. docs/data.md says why this beat the
libraries a headless CPU could run.

    python dataset/rooms.py --out data/builtin/rooms_ring_camera --train_scenes 5000 --test_scenes 500 --workers 2
"""
import functools
import math
from dataclasses import dataclass

import numpy as np
import simplejpeg

if not __package__:  # `python dataset/rooms.py`: the repository's modules, one folder up
    import _repo  # noqa: F401
import cameras  # noqa: E402
from cli import main as cli_main  # noqa: E402
from dataset import builtin  # noqa: E402
from dataset.raycast import blocked, bounds, light_frame, nearest_object, near_shadow_rays  # noqa: E402
from gqn_format import JPEG_QUALITY  # noqa: E402

NAME = "rooms_ring_camera"
IMAGE_SIZE = 64
VIEWS = 10
ROOM = 3.5                     # half the room's side: walls at x, y = -+3.5
WALL = 1.0                     # wall height; the floor is z = 0
RING, HEIGHT = 3.2, 0.75       # the cameras' ring (radius, height), looking at the floor's centre
FOV = math.radians(45.0)       # full field of view (square image)
SKY_LOW, SKY_HIGH = np.array([153, 226, 249]) / 255, np.array([110, 190, 240]) / 255  # at the horizon, above
WALLS = {"red": (0.72, 0.16, 0.14), "green": (0.26, 0.62, 0.26), "cerise": (0.82, 0.16, 0.46),
         "orange": (0.90, 0.48, 0.12), "yellow": (0.88, 0.78, 0.22)}
FLOORS = {"yellow": (0.86, 0.74, 0.36), "white": (0.86, 0.86, 0.83), "blue": (0.30, 0.46, 0.78)}
SHAPES = ("box", "sphere", "cylinder", "capsule", "cone", "icosahedron", "triangle")
GRID, JITTER = 1.5, 0.3        # objects stand near the points of a 3x3 grid of this spacing
AMBIENT, SUN = 0.45, 0.65      # Lambertian shading: colour * (AMBIENT + SUN * max(n.l, 0) * unshadowed)
EDGE_RAYS = ((0.75, 0.75),)     # antialiasing: a pixel on an edge averages these rays with its first, at (0.25, 0.25)


# ------------------------------------------------------------------------------------------------ the scene

def random_colour(rng):
    """A saturated colour: HSV with a random hue, s in [0.85, 1], v in [0.75, 1] -> RGB in [0, 1]."""
    h, s, v = rng.random(), rng.uniform(0.85, 1.0), rng.uniform(0.75, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + 6 * h) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def random_scene(rng):
    """A room: its wall and floor colours, the light's direction, and 1-3 objects at distinct grid points."""
    wall = list(WALLS)[rng.integers(len(WALLS))]
    floor = list(FLOORS)[rng.integers(len(FLOORS))]
    azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(math.radians(35), math.radians(65))
    light = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                      math.sin(elevation)])
    points = rng.choice(9, size=int(rng.integers(1, 4)), replace=False)
    objects = []
    for p in points:
        centre = (np.array([p % 3 - 1, p // 3 - 1]) * GRID + rng.uniform(-JITTER, JITTER, 2))
        objects.append(dict(shape=SHAPES[rng.integers(len(SHAPES))], centre=centre, yaw=rng.uniform(0, 2 * math.pi),
                            size=rng.uniform(0.7, 1.0), colour=random_colour(rng)))
    return dict(wall=wall, floor=floor, light=light, frame=light_frame(light), objects=objects)


def random_cameras(rng, views=VIEWS):
    """float32 [views, 5] (x, y, z, yaw, pitch): on the ring, each looking at the floor's centre."""
    yaw = rng.uniform(-math.pi, math.pi, views)
    pitch = np.full(views, -math.atan2(HEIGHT, RING))
    position = -math.hypot(RING, HEIGHT) * cameras.direction(yaw, pitch)
    return np.concatenate([position, yaw[:, None], pitch[:, None]], axis=1).astype(np.float32)


def camera_model():
    """The camera model the shards record (gqn_format.camera_model): the field of view, and the depths along a
    camera's axis where what it sees can lie: from just in front of it to the far corner of the room."""
    return dict(fov=math.degrees(FOV), near=0.2, far=round(math.hypot(RING + ROOM, ROOM) * 1.05, 2))


# ------------------------------------------------------------------------------------------------ the room

def _hash(i, j):
    """Deterministic pseudo-random values in [0, 1) for integer grid cells (i, j) (arrays)."""
    v = np.sin(i * 12.9898 + j * 78.233) * 43758.5453
    return v - np.floor(v)


TEXELS = 48  # texels a unit of the textures' lookup tables


@functools.lru_cache(maxsize=None)
def floor_pattern():
    """The floor's brightness over the whole room (float32 [7 * TEXELS, 7 * TEXELS]): tiles 0.7 units a side with
    darker grout, each a little lighter or darker, and a fine grain."""
    x = (np.arange(2 * ROOM * TEXELS) + 0.5) / TEXELS - ROOM
    x, y = np.meshgrid(x, x, indexing="ij")
    fx, fy = x / 0.7, y / 0.7
    ix, iy = np.floor(fx), np.floor(fy)
    gx, gy = fx - ix, fy - iy
    grout = (np.minimum(gx, 1 - gx) < 0.035) | (np.minimum(gy, 1 - gy) < 0.035)
    shade = (0.88 + 0.16 * _hash(ix, iy)) * (0.96 + 0.04 * _hash(np.floor(x / 0.06), np.floor(y / 0.06) + 7))
    return np.where(grout, 0.72, shade).astype(np.float32)


@functools.lru_cache(maxsize=None)
def wall_pattern():
    """The walls' brightness, the four walls side by side (float32 [4 * 7 * TEXELS, WALL * TEXELS]): bricks 0.5 x
    0.2 units in offset rows with darker mortar, each a little lighter or darker."""
    u = (np.arange(4 * 2 * ROOM * TEXELS) + 0.5) / TEXELS
    z = (np.arange(int(WALL * TEXELS)) + 0.5) / TEXELS
    u, z = np.meshgrid(u, z, indexing="ij")
    row = np.floor(z / 0.2)
    fu = u / 0.5 + 0.5 * (row % 2)
    col = np.floor(fu)
    gu, gz = fu - col, z / 0.2 - row
    mortar = (np.minimum(gu, 1 - gu) < 0.04) | (np.minimum(gz, 1 - gz) < 0.08)
    shade = (0.86 + 0.18 * _hash(col, row + 31)) * (0.96 + 0.04 * _hash(np.floor(u / 0.05), np.floor(z / 0.05)))
    return np.where(mortar, 0.7, shade).astype(np.float32)


def _texel(a, n):
    """Coordinates a (units, from the texture's start) -> the texel's index in [0, n)."""
    return np.clip(a * TEXELS, 0, n - 1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def room_pattern():
    """floor_pattern and wall_pattern flattened one after the other: one lookup serves floor and walls."""
    return np.concatenate([floor_pattern().ravel(), wall_pattern().ravel()])


def room_hit(o, d):
    """Rays from inside the room -> (t [N], inf for the sky; what: 0 floor, 1 wall, 2 sky; normal [3, N])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = (np.copysign(ROOM, d[0]) - o[0]) / d[0]
        ty = (np.copysign(ROOM, d[1]) - o[1]) / d[1]
        tf = np.where(d[2] < 0, -o[2] / d[2], np.inf)
    tw = np.minimum(tx, ty)
    floor = tf <= tw
    wall = ~floor & (o[2] + tw * d[2] <= WALL)
    t = np.where(floor, tf, np.where(wall, tw, np.inf))
    x_wall, on_wall = tx < ty, ~floor
    normal = np.zeros(d.shape, dtype=d.dtype)
    normal[0] = -np.sign(d[0]) * (x_wall & on_wall)
    normal[1] = -np.sign(d[1]) * (~x_wall & on_wall)
    normal[2] = floor
    return t, np.where(floor, 0, np.where(wall, 1, 2)), normal


def wall_shadow(p, light):
    """Whether points p [3, N] inside the room see the light over the walls (False) or not."""
    d = np.broadcast_to(light[:, None], p.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.minimum((np.copysign(ROOM, d[0]) - p[0]) / d[0], (np.copysign(ROOM, d[1]) - p[1]) / d[1])
    return p[2] + t * d[2] < WALL - 1e-4


def sky(d):
    """The sky's colour along directions d [3, N]: lighter at the horizon -> RGB [N, 3]."""
    up = np.clip(d[2] / np.sqrt((d * d).sum(0)) * 2.5, 0, 1)[:, None]
    return (SKY_LOW[None] * (1 - up) + SKY_HIGH[None] * up).astype(d.dtype)


# ------------------------------------------------------------------------------------------------ rendering

def lighting(scene, p, n, on=None):
    """Points p [3, N] on surfaces of normals n (on: the object each lies on, if on one) -> (their sun term n.l, 0
    facing away; in a wall's shadow; in an object's shadow, asked only where the first two leave the sun shining)."""
    light = scene["light"].astype(p.dtype)
    lit = np.maximum(light @ n, 0)
    by_wall = wall_shadow(p, light)
    # Only a point that faces the sun over the walls needs its shadow ray; and the objects are convex, so a point
    # facing the sun never sees its own object in the way.
    sunny = (lit > 0) & ~by_wall
    start = p + 1e-3 * n
    near = near_shadow_rays(scene["objects"], start, scene["frame"])
    near = [m & sunny if on is None else m & sunny & (on != i) for i, m in enumerate(near)]
    return lit, by_wall, blocked(scene["objects"], start, light[:, None], near)


def room_colour(scene, p, what, normal):
    """The room's own colour (texture, no light) at points p [3, N] of the floor (what 0) or a wall (1)."""
    (f0, f1), (w0, w1) = floor_pattern().shape, wall_pattern().shape
    floor_texel = _texel(p[0] + ROOM, f0) * f1 + _texel(p[1] + ROOM, f1)
    x_wall = normal[0] != 0
    u = np.where(x_wall, p[1], p[0])
    which = np.where(x_wall, normal[0] > 0, 2 + (normal[1] > 0))  # each wall its own stretch of the pattern
    wall_texel = f0 * f1 + _texel(u + ROOM + 2 * ROOM * which, w0) * w1 + _texel(p[2], w1)
    floor = (what == 0)[:, None]
    value = room_pattern()[np.where(floor[:, 0], floor_texel, wall_texel)]
    colour = np.where(floor, np.float32(FLOORS[scene["floor"]]), np.float32(WALLS[scene["wall"]]))
    return value[:, None] * colour


def shade(scene, o, d, near):
    """Rays from camera centres o [3, N] along d [3, N], near[i] those that may meet object i -> (RGB with the
    objects [N, 3], RGB of the empty room, whether the objects change the pixel [N], a label of what the ray hit [N]:
    object index, else 10 + floor/wall/sky)."""
    t_room, what, n_room = room_hit(o, d)
    up = what == 2
    # A ray to the sky stops at its camera (t 0) and goes through the room's arithmetic with the others: cheaper
    # than picking the others out. Its normal is 0, so it is unlit and casts no shadow ray; the sky replaces it.
    p = o + np.where(up, 0, t_room) * d
    lit, by_wall, by_object = lighting(scene, p, n_room)
    base = room_colour(scene, p, what, n_room)
    empty = base * (AMBIENT + SUN * lit * ~by_wall)[:, None]
    empty[up] = sky(d[:, up])
    shadowed = by_object & ~by_wall & (lit > 0)  # the objects' shadows on the room
    full = np.where(shadowed[:, None], base * AMBIENT, empty)
    t_obj, index, n_obj = nearest_object(scene["objects"], o, d, near)
    on = np.nonzero(t_obj < t_room)[0]
    if len(on):
        q = (o if o.shape[1] == 1 else o[:, on]) + t_obj[on] * d[:, on]
        lit_o, by_wall_o, by_object_o = lighting(scene, q, n_obj[:, on], index[on])
        colours = np.array([obj["colour"] for obj in scene["objects"]], dtype=d.dtype)
        full[on] = colours[index[on]] * (AMBIENT + SUN * lit_o * ~(by_wall_o | by_object_o))[:, None]
    changed = shadowed.copy()
    changed[on] = True
    label = np.where(t_obj < t_room, index, 10 + what)
    return np.clip(full, 0, 1), np.clip(empty, 0, 1), changed, label


class Rays:
    """Rays through the pixels of a scene's views (raw cameras [V, 5]), with, for each object, the rays that pass
    its bounding sphere (the cone from the camera around it), the only ones traced against it."""

    def __init__(self, scene, raw, size):
        raw = np.asarray(raw, np.float64)
        d, right, up = cameras.axes(np.sin(raw[:, 3]), np.cos(raw[:, 3]), np.sin(raw[:, 4]), np.cos(raw[:, 4]))
        f = size / 2 / math.tan(FOV / 2)
        self.size = size
        self.fd, self.right, self.up = ((f * d).T.astype(np.float32), right.T.astype(np.float32),
                                        up.T.astype(np.float32))
        self.o = raw[:, :3].T.astype(np.float32)                                   # (3, V)
        self.towards, self.cos = [], []  # each object's centre's direction from each camera, cos of its radius
        for obj in scene["objects"]:
            centre, radius = bounds(obj)
            w = centre - raw[:, :3]
            dist = np.linalg.norm(w, axis=1)
            self.towards.append((w / dist[:, None]).T.astype(np.float32))
            self.cos.append(np.where(dist > radius, np.sqrt(np.maximum(1 - (radius / dist) ** 2, 0)), -1.0))

    def every_pixel(self, offset=0.25):
        """One ray a pixel of every view, at `offset` within it -> (o, d [3, V * size^2], near)."""
        n = self.size
        x = np.arange(n, dtype=np.float32) + offset - n / 2
        rays = (self.fd[:, :, None, None] + x[None, None, None, :] * self.right[:, :, None, None]
                - x[None, None, :, None] * self.up[:, :, None, None])              # (3, V, rows, cols)
        length = np.sqrt((rays * rays).sum(0))
        near = [((w[:, :, None, None] * rays).sum(0) >= cos[:, None, None] * length).ravel()
                for w, cos in zip(self.towards, self.cos)]
        return np.repeat(self.o, n * n, axis=1), rays.reshape(3, -1), near

    def through(self, v, r, c):
        """Rays through pixel positions (r, c) (floats, pixel units from the top left) of views v."""
        x, y = (c - self.size / 2).astype(np.float32), (r - self.size / 2).astype(np.float32)
        rays = self.fd[:, v] + x * self.right[:, v] - y * self.up[:, v]
        length = np.sqrt((rays * rays).sum(0))
        near = [(w[:, v] * rays).sum(0) >= cos[v] * length for w, cos in zip(self.towards, self.cos)]
        return self.o[:, v], rays, near


def render_views(scene, raw, size=IMAGE_SIZE, edge_rays=EDGE_RAYS):
    """The scene from raw cameras [V, 5] -> (images uint8 [V, size, size, 3], the empty room's, masks bool [V, size,
    size]: where the objects or their shadows are). One ray a pixel, then `edge_rays` more on edges."""
    rays, V = Rays(scene, raw, size), len(raw)
    full, empty, changed, label = shade(scene, *rays.every_pixel())
    full, empty = full.reshape(V, size, size, 3), empty.reshape(V, size, size, 3)
    changed, label = changed.reshape(V, size, size), label.reshape(V, size, size)
    if edge_rays:  # antialiasing: a pixel whose 4 neighbours do not all show what it shows
        padded = np.pad(label, ((0, 0), (1, 1), (1, 1)), mode="edge")
        centre = padded[:, 1:-1, 1:-1]
        edge = ((padded[:, :-2, 1:-1] != centre) | (padded[:, 2:, 1:-1] != centre)
                | (padded[:, 1:-1, :-2] != centre) | (padded[:, 1:-1, 2:] != centre))
        v, r, c = np.nonzero(edge)
        sr, sc = np.array(edge_rays, dtype=np.float64).T
        k = len(sr)
        f2, e2, c2, _ = shade(scene, *rays.through(np.repeat(v, k), (r[:, None] + sr).ravel(),
                                                   (c[:, None] + sc).ravel()))
        full[v, r, c] = (full[v, r, c] + f2.reshape(-1, k, 3).sum(1)) / (k + 1)
        empty[v, r, c] = (empty[v, r, c] + e2.reshape(-1, k, 3).sum(1)) / (k + 1)
        changed[v, r, c] |= c2.reshape(-1, k).any(1)
    to_bytes = lambda im: (im * 255 + 0.5).astype(np.uint8)  # noqa: E731
    return to_bytes(full), to_bytes(empty), changed


def fast_jpeg(image):
    """uint8 [H, W, 3] -> JPEG bytes at quality 95 with 4:2:0 chroma subsampling (gqn_format.JPEG_QUALITY), by
    libjpeg-turbo through simplejpeg: 4x faster than Pillow's encoder, a fifth of this renderer's time otherwise."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=JPEG_QUALITY, colorspace="RGB",
                                  colorsubsampling="420")


def render_scene(seed, split, index, views=VIEWS, objects_recorded=True):
    """One scene, a pure function of (seed, split, index) -> {"frames": `views` JPEG bytes, "cameras": float32
    [views, 5], and with objects_recorded "empty": the empty room's JPEG bytes, "masks": bool [views, 64, 64]}."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    scene = random_scene(rng)
    raw = random_cameras(rng, views)
    full, empty, masks = render_views(scene, raw)
    out = dict(frames=[fast_jpeg(im) for im in full], cameras=raw)
    if objects_recorded:
        out.update(empty=[fast_jpeg(im) for im in empty], masks=masks)
    return out


@dataclass(frozen=True)
class Rooms:
    """The rooms world, for dataset/builtin.py. What the objects change is recorded in the test split only (the
    object score reads it; training does not)."""
    views: int = VIEWS
    image_size: int = IMAGE_SIZE
    name: str = NAME
    describe: str = "rooms with 1-3 objects"

    def seconds(self, scenes, workers):
        """About how long rendering takes on this many cores (19 ms a scene and core, the AVX2 EPYC's 5500 in 51 s)."""
        return 0.019 * scenes / workers

    def camera_model(self):
        return camera_model()

    def render_scene(self, seed, split, index):
        return render_scene(seed, split, index, self.views, objects_recorded=split == "test")


def run(argv):
    p = builtin.render_parser("Render look-alikes of DeepMind's rooms_ring_camera scenes into OUT/train and OUT/test "
                              "in the converted format (the test split also records what the objects change: the "
                              "empty room and the objects' masks).")
    builtin.render_command(p.parse_args(argv), Rooms())


def main(argv=None):
    cli_main(run, argv)


if __name__ == "__main__":
    main()
