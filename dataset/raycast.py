"""Ray casting against the rooms' objects (dataset/rooms.py): convex polyhedra (box, icosahedron, triangle) by their
faces' half-spaces, quadrics (sphere, cylinder, capsule, cone) by their equations, in numpy, many rays at once.

An object is a unit shape standing on z = 0, scaled by its size, turned by its yaw about z and placed at its centre
on the floor. Rays are given as origins o and directions d, [3, N] arrays (o may be [3, 1]), t in units of |d|.
A ray is traced against an object only if it passes the object's bounding sphere (bounds: its shape's smallest).
"""
import math
from itertools import combinations

import numpy as np

def _polyhedron(vertices):
    """Faces of the convex hull of `vertices` (each face's plane once) -> (normals [K, 3], offsets [K])."""
    planes = []
    for a, b, c in combinations(range(len(vertices)), 3):
        n = np.cross(vertices[b] - vertices[a], vertices[c] - vertices[a])
        if np.linalg.norm(n) < 1e-9:
            continue
        n = n / np.linalg.norm(n)
        off = n @ vertices[a]
        side = vertices @ n - off
        if (side <= 1e-9).all() or (side >= -1e-9).all():
            n, off = (n, off) if (side <= 1e-9).all() else (-n, -off)
            if not any(np.allclose(n, m) and abs(off - o) < 1e-9 for m, o in planes):
                planes.append((n, off))
    return np.array([n for n, _ in planes]), np.array([o for _, o in planes])


def _unit_vertices():
    """The polyhedra's vertices at unit size, standing on z = 0."""
    box = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (0.0, 1.0)])
    g = (1 + math.sqrt(5)) / 2
    ico = np.array([p for s1 in (-1, 1) for s2 in (-1, 1)
                    for p in ([0, s1, s2 * g], [s1, s2 * g, 0], [s2 * g, 0, s1])], dtype=float)
    ico = ico / np.linalg.norm(ico[0]) * 0.6
    ico[:, 2] -= ico[:, 2].min()
    tri = np.array([[x, y, z] for y in (-0.45, 0.45) for x, z in ((-0.55, 0.0), (0.55, 0.0), (0.0, 0.95))])
    return {"box": box, "icosahedron": ico, "triangle": tri}


VERTICES = _unit_vertices()
POLYHEDRA = {shape: _polyhedron(v) for shape, v in VERTICES.items()}
# The quadrics as spheres (or points, radius 0) at (x, 0, z) whose hull holds them; every shape is round about z or,
# for the polyhedra, given by its vertices. Sizes as in _local_hit.
_PARTS = {"sphere": [(0.0, 0.5, 0.5)], "cylinder": [(0.42, 0.0, 0.0), (0.42, 0.9, 0.0)],
          "cone": [(0.5, 0.0, 0.0), (0.0, 1.0, 0.0)],
          "capsule": [(0.0, 0.32, 0.32), (0.0, 0.88, 0.32), (0.32, 0.32, 0.0), (0.32, 0.88, 0.0)]}


def _enclosing(parts):
    """The smallest sphere centred on the z axis holding parts (axis distance, z, radius) -> (centre z, radius)."""
    r, z, own = np.array(parts, dtype=float).T
    zs = np.linspace(z.min(), z.max(), 2001)
    reach = (np.hypot(r[None], z[None] - zs[:, None]) + own[None]).max(1)
    return zs[reach.argmin()], reach.min()


BOUNDS = {**{s: _enclosing([(math.hypot(x, y), z, 0.0) for x, y, z in v]) for s, v in VERTICES.items()},
          **{s: _enclosing(p) for s, p in _PARTS.items()}}


def _planes_hit(o, d, normals, offsets):
    """Rays (o, d: [3, N]) against a convex polyhedron n.x <= offset -> (t [N], inf where missed; normal [3, N])."""
    no, nd = normals @ o, normals @ d                                      # (K, N)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offsets[:, None] - no) / nd
    entering = np.where(nd < 0, t, -np.inf)
    face = entering.argmax(0)                                              # the face each ray enters by
    t_enter = np.take_along_axis(entering, face[None], 0)[0]
    t_exit = np.where(nd > 0, t, np.inf).min(0)
    hit = (t_enter <= t_exit) & (t_enter > 1e-4)
    if (nd == 0).any():  # a ray parallel to a face's plane, outside it, misses (rare: float32 seldom gives 0)
        hit &= ~((nd == 0) & (no > offsets[:, None])).any(0)
    # a missed ray's normal is that of its entering plane: never read, since its t is inf
    return np.where(hit, t_enter, np.inf), normals.T.astype(d.dtype)[:, face]


def _sphere_hit(o, d, centre_z, r):
    """Rays against the sphere of radius r centred at (0, 0, centre_z) -> (t, normal)."""
    oc = o - np.array([[0.0], [0.0], [centre_z]], dtype=o.dtype)
    a, b, c = (d * d).sum(0), (oc * d).sum(0), (oc * oc).sum(0) - r * r
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    t = np.where((disc >= 0) & (t > 1e-4), t, np.inf)
    p = oc + np.where(np.isfinite(t), t, 0) * d
    return t, p / r


def _cylinder_hit(o, d, r, z0, z1, cap=True):
    """Rays against the side of the cylinder x^2 + y^2 = r^2, z0 <= z <= z1 (and its top cap) -> (t, normal)."""
    a = d[0] * d[0] + d[1] * d[1]
    b = o[0] * d[0] + o[1] * d[1]
    c = o[0] * o[0] + o[1] * o[1] - r * r
    disc = b * b - a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (-b - np.sqrt(disc)) / a
        z = o[2] + t * d[2]
        t = np.where((disc >= 0) & (t > 1e-4) & (z >= z0) & (z <= z1), t, np.inf)
        t_cap = (z1 - o[2]) / d[2]
    t0 = np.where(np.isfinite(t), t, 0)
    normal = np.stack([o[0] + t0 * d[0], o[1] + t0 * d[1], np.zeros_like(t)]) / r
    if cap:
        px, py = o[0] + t_cap * d[0], o[1] + t_cap * d[1]
        t_cap = np.where((d[2] < 0) & (t_cap > 1e-4) & (px * px + py * py <= r * r), t_cap, np.inf)
        top = t_cap < t
        t = np.where(top, t_cap, t)
        normal = np.where(top, np.array([[0.0], [0.0], [1.0]], dtype=o.dtype), normal)
    return t, normal


def _cone_hit(o, d, r, h):
    """Rays against the cone of base radius r on z = 0 and apex (0, 0, h) -> (t, normal)."""
    k2 = (r / h) ** 2
    w = h - o[2]
    a = d[0] * d[0] + d[1] * d[1] - k2 * d[2] * d[2]
    b = o[0] * d[0] + o[1] * d[1] + k2 * w * d[2]
    c = o[0] * o[0] + o[1] * o[1] - k2 * w * w
    disc = b * b - a * c
    best = np.full(a.shape, np.inf, dtype=o.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        for sign in (-1.0, 1.0):
            t = (-b + sign * np.sqrt(disc)) / a
            z = o[2] + t * d[2]
            best = np.where((disc >= 0) & (t > 1e-4) & (z >= 0) & (z <= h) & (t < best), t, best)
    p = o + np.where(np.isfinite(best), best, 0) * d
    normal = np.stack([p[0], p[1], k2 * (h - p[2])])
    return best, normal / np.maximum(np.linalg.norm(normal, axis=0), 1e-9)


def _local_hit(shape, o, d):
    """Rays in an object's own frame (unit size, standing on z = 0) -> (t, normal in that frame)."""
    if shape in POLYHEDRA:
        return _planes_hit(o, d, *POLYHEDRA[shape])
    if shape == "sphere":
        return _sphere_hit(o, d, 0.5, 0.5)
    if shape == "cylinder":
        return _cylinder_hit(o, d, 0.42, 0.0, 0.9)
    if shape == "cone":
        return _cone_hit(o, d, 0.5, 1.0)
    # capsule: a cylinder between two half spheres
    hits = [_cylinder_hit(o, d, 0.32, 0.32, 0.88, cap=False), _sphere_hit(o, d, 0.32, 0.32),
            _sphere_hit(o, d, 0.88, 0.32)]
    t = np.minimum.reduce([h[0] for h in hits])
    normal = hits[0][1]
    for ti, ni in hits[1:]:
        normal = np.where(ti == t, ni, normal)
    return t, normal


def object_hit(obj, o, d):
    """Rays (o, d [3, N], world) against one object -> (t [N], inf where missed; world normal [3, N])."""
    c, s = math.cos(obj["yaw"]), math.sin(obj["yaw"])
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=o.dtype)  # world -> object
    shift = np.array([[obj["centre"][0]], [obj["centre"][1]], [0.0]], dtype=o.dtype)
    t, n = _local_hit(obj["shape"], rot @ (o - shift) / obj["size"], rot @ d / obj["size"])
    return t, rot.T @ n


def bounds(obj):
    """An object's bounding sphere, its shape's smallest about its axis with 1% to spare: (centre [3], radius).
    Only the rays that pass it are traced against the object (a looser sphere cost 1.8x the rays)."""
    z, radius = BOUNDS[obj["shape"]]
    return np.array([obj["centre"][0], obj["centre"][1], z * obj["size"]]), 1.01 * radius * obj["size"]


def nearest_object(objects, o, d, near):
    """The nearest object along each ray (o [3, N] or [3, 1], d [3, N]) -> (t [N], inf where none; index [N], -1
    where none; normal [3, N]). near[i]: the rays that may meet object i (a cheap bound); only they are traced."""
    n = d.shape[1]
    t, index, normal = np.full(n, np.inf, dtype=d.dtype), np.full(n, -1), np.zeros((3, n), dtype=d.dtype)
    for i, obj in enumerate(objects):
        k = np.nonzero(near[i])[0]
        if not len(k):
            continue
        ti, ni = object_hit(obj, o if o.shape[1] == 1 else o[:, k], d[:, k])
        closer = ti < t[k]
        k, ti, ni = k[closer], ti[closer], ni[:, closer]
        t[k], index[k], normal[:, k] = ti, i, ni
    return t, index, normal


def light_frame(light):
    """Axes with the light's direction last, [3, 3] float64: the first two span the plane across the light."""
    e1 = np.cross(light, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(light, e1), light])


def blocked(objects, o, d, near):
    """Whether each ray (o [3, N]; d [3, N], or [3, 1] for one direction) meets an object on its way. near[i]: the
    rays that may meet object i; a ray already blocked is not traced again."""
    hit = np.zeros(o.shape[1], dtype=bool)
    for obj, may in zip(objects, near):
        k = np.nonzero(may & ~hit)[0]
        if len(k):
            t, _ = object_hit(obj, o[:, k], d if d.shape[1] == 1 else d[:, k])
            hit[k[np.isfinite(t)]] = True
    return hit


def near_shadow_rays(objects, p, frame):
    """For each object, the points p [3, N] whose ray towards the light passes its bounding sphere: in the plane
    across the light (frame: light_frame), within the sphere's radius of its centre, and not beyond it."""
    a, b, along = frame.astype(p.dtype) @ p
    out = []
    for obj in objects:
        centre, radius = bounds(obj)
        qa, qb, q_along = frame @ centre
        out.append(((a - qa) ** 2 + (b - qb) ** 2 <= radius * radius) & (along < q_along + radius))
    return out
