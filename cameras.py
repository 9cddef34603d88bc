"""DeepMind's camera convention, in one place: raw cameras, the 7-d pose v, camera frames, look-at cameras, rings.

Eslami et al. 2018 condition on a viewpoint v^k per image. gqn-datasets stores five raw numbers per view,
(x, y, z, yaw, pitch) in radians with world z up, and data_reader.py turns them into the 7-d pose the networks
read, v = (x, y, z, sin yaw, cos yaw, sin pitch, cos pitch) (torch-gqn puts cos first: not DeepMind's order).
The camera at (x, y, z) looks along d = (cos p cos y, -cos p sin y, sin p); image right is d x z (normalised),
image up is right x d, so world z is image up and the image is not mirrored. Shepard-Metzler cameras sit 10/3
from the object's centre and look at it (placed at -(10/3) d) with a 20-degree field of view.

Other software's cameras: a 4x4 camera-to-world matrix in the OpenGL convention (NeRF, instant-ngp, nerfstudio:
columns image right, image up, -forward, position) converts to raw cameras and back (from_matrix, matrix); the
raw cameras cannot express a camera rotated about its own axis (roll), so from_matrix returns the roll it drops.

Users: gqn_dataset.py and dataset/convert2torch.py (raw -> pose7), volume.py (camera_frames), the renderer in
dataset/shepard_metzler.py (directions and frames, in float64 numpy), render.py and hubconf.py (look_at,
pose_from_to, ring, angles), dataset/import_scenes.py and export_scenes.py (matrices, look_point).
Every function takes numpy arrays or torch tensors and returns the same kind, except the last three (numpy).
"""
import math

import numpy as np
import torch


def _torch(a):
    return isinstance(a, torch.Tensor)


def _stack(parts, like):
    return torch.stack(parts, -1) if _torch(like) else np.stack(parts, axis=-1)


def direction(yaw, pitch):
    """The view direction d (..., 3) of cameras with this yaw and pitch (radians, arrays of one shape)."""
    m = torch if _torch(yaw) else np
    return axes(m.sin(yaw), m.cos(yaw), m.sin(pitch), m.cos(pitch))[0]


def pose7(raw):
    """Raw cameras (..., 5) (x, y, z, yaw, pitch) -> the 7-d pose (..., 7) (x, y, z, sin/cos yaw, sin/cos pitch).

    Computed in float32 as TensorFlow does in data_reader.py (the converted data holds these exact bits).
    """
    if raw.shape[-1] != 5:
        raise ValueError(f"pose7 expects [..., 5] cameras, got shape {tuple(raw.shape)}")
    if _torch(raw):
        c = raw.to(torch.float32)
        yaw, pitch = c[..., 3:4], c[..., 4:5]
        return torch.cat([c[..., :3], yaw.sin(), yaw.cos(), pitch.sin(), pitch.cos()], dim=-1)
    c = np.asarray(raw, dtype=np.float32)
    yaw, pitch = c[..., 3:4], c[..., 4:5]
    return np.concatenate([c[..., :3], np.sin(yaw), np.cos(yaw), np.sin(pitch), np.cos(pitch)], axis=-1)


def axes(sin_yaw, cos_yaw, sin_pitch, cos_pitch):
    """Forward d, right and up unit vectors (..., 3) of a camera, from its angles' sines and cosines."""
    m = torch if _torch(sin_yaw) else np
    d = _stack([cos_pitch * cos_yaw, -cos_pitch * sin_yaw, sin_pitch], sin_yaw)
    right = _stack([-sin_yaw, -cos_yaw, m.zeros_like(sin_yaw)], sin_yaw)  # d x world z, normalised (for |pitch| < 90)
    up = torch.cross(right, d, dim=-1) if _torch(d) else np.cross(right, d)
    return d, right, up


def camera_frames(v):
    """7-d poses v (..., 7) -> camera origin, forward d, right and up unit vectors, each (..., 3)."""
    return (v[..., :3], *axes(v[..., 3], v[..., 4], v[..., 5], v[..., 6]))


def angles(v):
    """7-d poses (..., 7) -> yaw, pitch (...) in radians."""
    m = torch if _torch(v) else np
    return m.arctan2(v[..., 3], v[..., 4]), m.arctan2(v[..., 5], v[..., 6])


def look_at(distance, yaw, pitch):
    """7-d poses (N, 7) of cameras looking at the origin from `distance`, as DeepMind's data places them."""
    yaw, pitch = torch.as_tensor(yaw, dtype=torch.float32), torch.as_tensor(pitch, dtype=torch.float32)
    pitch = pitch.expand_as(yaw)
    return torch.cat([-distance * direction(yaw, pitch), torch.stack([yaw.sin(), yaw.cos(), pitch.sin(),
                                                                      pitch.cos()], -1)], -1)


def pose_from_to(position, target=(0.0, 0.0, 0.0)):
    """7-d poses (N, 7) of cameras at `position` (N, 3) looking at `target` (3,) or (N, 3), world z up."""
    position = torch.as_tensor(position, dtype=torch.float32).reshape(-1, 3)
    d = torch.as_tensor(target, dtype=torch.float32) - position
    d = d / d.norm(dim=-1, keepdim=True)
    yaw, pitch = torch.atan2(-d[:, 1], d[:, 0]), torch.asin(d[:, 2].clamp(-1, 1))  # inverts direction()
    return torch.cat([position, torch.stack([yaw.sin(), yaw.cos(), pitch.sin(), pitch.cos()], -1)], -1)


def ring(v, n, yaw0=None, pitch=None):
    """n poses evenly spaced in yaw around the scene whose views sit at v (S, 7): the views' mean distance and
    pitch (or `pitch`), starting at the first view's yaw (or `yaw0`)."""
    yaw, p = angles(v)
    distance = v[:, :3].norm(dim=-1).mean()
    yaw0 = yaw[0] if yaw0 is None else torch.as_tensor(yaw0)
    pitch = p.mean() if pitch is None else torch.as_tensor(pitch, dtype=torch.float32)
    return look_at(distance, yaw0 + torch.arange(n) * (2 * math.pi / n), pitch)


# World y up (as glTF and many renderers) -> DeepMind's world z up: (x, y, z) -> (x, -z, y), a proper rotation.
Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def matrix(raw, up="z"):
    """Raw cameras (..., 5) -> camera-to-world matrices (..., 4, 4), OpenGL convention, world `up` "z" or "y"."""
    raw = np.asarray(raw, dtype=np.float64)
    yaw, pitch = raw[..., 3], raw[..., 4]
    d, right, up_ = axes(np.sin(yaw), np.cos(yaw), np.sin(pitch), np.cos(pitch))
    m = np.zeros(raw.shape[:-1] + (4, 4))
    m[..., :3, 0], m[..., :3, 1], m[..., :3, 2], m[..., :3, 3] = right, up_, -d, raw[..., :3]
    m[..., 3, 3] = 1
    if up == "y":
        m[..., :3, :] = Y_UP.T @ m[..., :3, :]
    return m


def from_matrix(m, up="z"):
    """Camera-to-world matrices (..., 4, 4) or (..., 3, 4), OpenGL convention, world `up` "z" or "y" ->
    (raw cameras (..., 5) float64, roll (...) in radians).

    roll is the angle about the view direction from DeepMind's camera (image right = d x world z) to this one;
    the raw cameras drop it. A camera looking straight up or down takes its yaw from its image right instead.
    """
    m = np.asarray(m, dtype=np.float64)[..., :3, :]
    if up == "y":
        m = Y_UP @ m
    right = m[..., 0] / np.linalg.norm(m[..., 0], axis=-1, keepdims=True)
    d = -m[..., 2] / np.linalg.norm(m[..., 2], axis=-1, keepdims=True)
    pitch = np.arcsin(np.clip(d[..., 2], -1, 1))
    vertical = np.hypot(d[..., 0], d[..., 1]) < 1e-9
    yaw = np.where(vertical, np.arctan2(-right[..., 0], -right[..., 1]), np.arctan2(-d[..., 1], d[..., 0]))
    _, right0, up0 = axes(np.sin(yaw), np.cos(yaw), np.sin(pitch), np.cos(pitch))
    roll = np.arctan2((right * up0).sum(-1), (right * right0).sum(-1))
    return np.concatenate([m[..., 3], yaw[..., None], pitch[..., None]], axis=-1), roll


def look_point(origins, directions):
    """The point nearest (least squares) to the viewing axes of cameras at origins (V, 3) looking along unit
    directions (V, 3) -> (3,), or None when the axes are nearly parallel and meet nowhere in particular."""
    o, d = np.asarray(origins, np.float64), np.asarray(directions, np.float64)
    p = np.eye(3) - d[:, :, None] * d[:, None, :]                           # (V, 3, 3) projections across each axis
    a, b = p.sum(0), np.einsum("vij,vj->i", p, o)
    if np.linalg.eigvalsh(a)[0] < 1e-4 * len(o):                          # all axes within about 1 degree
        return None
    return np.linalg.solve(a, b)
