"""The browser's camera and the data's 7-d pose: viser reports a camera as a position and an orientation quaternion
(OpenCV axes: +z forward, +y down); GQN's data holds (x, y, z, sin yaw, cos yaw, sin pitch, cos pitch) (cameras.py).
Both ways, for view.py's page and bench_view.py.
"""
import math

import numpy as np
import torch

from cameras import angles, camera_frames, from_matrix, pose7


def camera_pose(position, wxyz):
    """A browser camera (position (3,), orientation quaternion wxyz: OpenCV axes, +z forward, +y down) -> the data's
    7-d pose (7,) and the roll (degrees) a 7-d pose cannot express."""
    w, x, y, z = wxyz
    R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                  [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                  [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    gl = np.eye(4)
    gl[:3, 0], gl[:3, 1], gl[:3, 2], gl[:3, 3] = R[:, 0], -R[:, 1], -R[:, 2], position  # OpenGL: +y up, -z forward
    raw, roll = from_matrix(gl)
    return pose7(torch.tensor(raw, dtype=torch.float32)), math.degrees(float(roll))


def pose_wxyz(v):
    """A 7-d pose (7,) -> (position (3,), wxyz) of the camera in viser's OpenCV axes (a frustum's orientation)."""
    o, d, right, up = (t.numpy().astype(np.float64) for t in camera_frames(v))
    R = np.stack([right, -up, d], 1)  # columns: camera x right, y down, z forward
    w = math.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    if w > 1e-6:
        q = (w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w))
    else:  # a half turn: read the axis off the diagonal
        x = math.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2
        q = (0.0, x, (R[0, 1] + R[1, 0]) / (4 * x), (R[0, 2] + R[2, 0]) / (4 * x)) if x > 1e-6 else (0.0, 0.0, 0.0, 1.0)
    return o, np.array(q)


def distance_and_pitch(v):
    """7-d poses (..., 7) -> (distance from the world's origin, pitch in degrees), what the trained range bounds."""
    return v[..., :3].norm(dim=-1), torch.rad2deg(angles(v)[1])
