"""A geometry-aware representation for GQN: the context views read along the query camera's rays.

The paper's networks (representation.py) sum per-view codes r_i in each context view's own image frame, so the
generator has to learn 3D geometry from scratch before it can say where anything is in the query view; on a
2-core CPU that takes far longer than a 15-minute run. Here r is built in the query view's frame instead, from
the cameras themselves, in the spirit of the epipolar GQN (E-GQN: Tobin et al. 2019, "Geometry-aware neural
rendering") and of image-based volume rendering (pixelNeRF, IBRNet):

    features  F_i = [x_i, conv3x3(relu(conv3x3(x_i)))]      each context view at full resolution
    rays      one ray through each cell of an (2s/4 x 2s/4) grid of the query image (2x2 rays through each of r's
              cells: --cell_rays), D depths in [near, far] (`samples`, --depth_samples: 16 by default)
    samples   each 3D point p is projected into every context view i it falls in: F_i(π_i(p))
    per point mean and variance of those features over the views that see p, and the share of views that do
              -> MLP -> opacity α and a feature f  (a point inside the object looks alike from every view)
    per ray   volume rendering: Σ_d α_d Π_{e<d}(1 - α_e) f_d, the accumulated opacity and the mean depth
    r         2x2 cells to channels, 1x1 conv -> (r_dim, s/4, s/4), the shape of the tower's r

The generation and inference cores take this r exactly as they take the tower's. Cameras follow DeepMind's
7-d pose (x, y, z, sin yaw, cos yaw, sin pitch, cos pitch): the camera at (x, y, z) looks along
d = (cos p cos y, -cos p sin y, sin p), world z is image up, and the square image spans the field of view
`fov`. The defaults (fov 20 degrees, depths 10/3 -+ 0.63) fit the Shepard-Metzler data sets, DeepMind's and
the built-in one. train.py takes fov, near and far from the data when it records them (the built-in renderer and
dataset/import_scenes.py do); DeepMind's other data sets need their own --fov, --near and --far.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from cameras import camera_frames

# Sizes: the cheapest of the settings tried that scored best in the default run (README: the default run).
SAMPLES = 16      # depths per ray by default: one per 0.45 cube side over the Shepard-Metzler depth range
CELL_RAYS = 2     # rays per side of each of r's cells by default: silhouettes at half the image's resolution
FEATURES = 16     # channels of the per-view features and of the per-point feature f
HIDDEN = 32       # width of the per-point MLP


def project(points, v, tan_half_fov):
    """points (B, N, 3), cameras v (B, K, 7) -> image coordinates (B, K, N, 2) in grid_sample's [-1, 1]
    convention (x right, y down; -1 and 1 the image's outer edges) and whether each point is in front of the
    camera and inside the image (B, K, N)."""
    o, d, right, up = camera_frames(v)  # (B, K, 3)
    # the camera's axes as columns: x right, y down, depth; one matrix product instead of three products and sums
    q = (points[:, None] - o[:, :, None]) @ torch.stack([right, -up, d], -1)  # (B, K, N, 3)
    depth = q[..., 2:]
    xy = q[..., :2] / (depth.clamp(min=1e-6) * tan_half_fov)
    seen = (depth[..., 0] > 0) & (xy.abs() < 1).all(-1)
    return xy, seen


class ViewStats(torch.autograd.Function):
    """(sampled (B, K, c, N), zero where w is 0; w (B, K, 1, N) 0/1, whether view k sees point n; n (B, 1, N) = Σ_k w,
    at least 1) -> the mean and variance over the views that see each point, (B, c, N) each.

    The same function as (s·w).sum(1)/n and ((s - mean)²·w).sum(1)/n, with a hand-written backward: d mean/d s_k =
    w_k/n, d var/d s_k = 2 w_k (s_k - mean)/n (the path through the mean is Σ_k w_k (s_k - mean) = 0). Autograd's
    chain over the same formulas makes about ten passes over (B, K, c, N) tensors, the largest of a `cpu` preset
    step, and here the backward makes one; the rows that w zeroes get a gradient that grid_sample drops anyway.
    """

    @staticmethod
    def forward(ctx, sampled, w, n):
        mean = sampled.sum(1) / n
        d = (sampled - mean[:, None]).mul_(w)  # (B, K, c, N), 0 where unseen
        ctx.save_for_backward(d, n)
        return mean, (d * d).sum(1) / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_var):
        d, n = ctx.saved_tensors
        # into a tensor laid out like d: addcmul would lay its result out like its first, broadcast, operand
        grad = torch.addcmul((grad_mean / n)[:, None], d, (2 * grad_var / n)[:, None], out=torch.empty_like(d))
        return grad, None, None


class Volume(nn.Module):
    """r in the query view's frame, from the context views read along its rays (module docstring)."""

    def __init__(self, x_channels=3, r_dim=256, image_size=64, fov=20.0, near=2.7, far=3.97, samples=SAMPLES,
                 cell_rays=CELL_RAYS):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"representation 'volume' needs an image size divisible by 4, got {image_size}")
        if not 0 < fov < 180:
            raise ValueError(f"fov must be in (0, 180) degrees, got {fov}")
        if not 0 < near < far:
            raise ValueError(f"the depth range needs 0 < near < far, got near={near}, far={far}")
        if type(samples) is not int or samples < 1:
            raise ValueError(f"the rays need a whole number of depth samples, at least one, got {samples!r}")
        if type(cell_rays) is not int or cell_rays < 1:
            raise ValueError(f"each of r's cells needs a whole number of rays a side, at least one, got {cell_rays!r}")
        self.samples, self.cell_rays = samples, cell_rays
        self.tan_half_fov, self.near, self.far = math.tan(math.radians(fov) / 2), near, far
        self.rays = image_size // 4 * cell_rays  # rays per side of the query image
        self.r_size = image_size // 4
        self.conv1 = nn.Conv2d(x_channels, FEATURES, 3, padding=1)
        self.conv2 = nn.Conv2d(FEATURES, FEATURES, 3, padding=1)
        c = x_channels + FEATURES
        self.point = nn.Sequential(nn.Linear(2 * c + 1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                   nn.Linear(HIDDEN, 1 + FEATURES))  # -> opacity logit, f
        self.out = nn.Conv2d(cell_rays ** 2 * (FEATURES + 2), r_dim, 1)

    def features(self, x, mask):
        """F_i for every context view (B, K, c, H, W); padded views (mask False) are left at zero."""
        B, K = x.shape[:2]
        x = x.flatten(0, 1)
        if mask is None or torch.compiler.is_compiling():  # a compiled graph cannot take x[real]'s shape
            return torch.cat([x, F.relu(self.conv2(F.relu(self.conv1(x))))], 1).unflatten(0, (B, K))
        real = mask.flatten().nonzero().squeeze(1)
        xr = x[real]
        f = torch.cat([xr, F.relu(self.conv2(F.relu(self.conv1(xr))))], 1)
        return f.new_zeros(B * K, *f.shape[1:]).index_copy_(0, real, f).unflatten(0, (B, K))

    def depths(self, B, dtype, device, noise=None):
        """(B, D) sample depths along d: evenly spaced, each jittered within its slot while training by `noise`,
        uniform in [0, 1) (B, D) (None: drawn here)."""
        D = self.samples
        step = (self.far - self.near) / D
        t = self.near + step * (torch.arange(D, dtype=dtype, device=device) + 0.5)
        if self.training:  # stratified sampling: every depth gets seen, not only the D fixed ones
            u = torch.rand(B, D, dtype=dtype, device=device) if noise is None else noise.to(dtype)
            return t + step * (u - 0.5)
        return t.expand(B, D)

    def forward(self, x, v, mask, v_q, noise=None):
        """x (B, K, 3, H, W), v (B, K, 7), mask bool (B, K) or None, v_q (B, 7), noise (B, samples) for the depths
        or None -> r (B, r_dim, H/4, W/4)."""
        return self.read(self.features(x, mask), v, mask, v_q, noise)

    def read(self, feats, v, mask, v_q, noise=None):
        """The query's part of forward, from the context views' features (features(): the same for every query
        camera of a scene, so a viewer computes them once) -> r (B, r_dim, H/4, W/4)."""
        B, K = feats.shape[:2]
        n, D = self.rays, self.samples
        dtype, device = v_q.dtype, v_q.device  # the inputs' precision, not autocast's
        # points along the query rays, at depths t measured along the query camera's forward axis
        o, d, right, up = camera_frames(v_q)  # (B, 3)
        g = (torch.arange(n, dtype=dtype, device=device) + 0.5) * (2 / n) - 1  # cell centres in [-1, 1]
        gy, gx = torch.meshgrid(g, g, indexing="ij")
        rays = d[:, None, None] + self.tan_half_fov * (gx[..., None] * right[:, None, None]
                                                       - gy[..., None] * up[:, None, None])  # (B, n, n, 3)
        t = self.depths(B, dtype, device, noise)
        points = o[:, None, None, None] + t[:, None, None, :, None] * rays[:, :, :, None]  # (B, n, n, D, 3)
        xy, seen = project(points.reshape(B, -1, 3), v, self.tan_half_fov)  # (B, K, N, 2), (B, K, N)
        real = torch.full((B, 1, 1), K, dtype=dtype, device=device)  # real context views per scene
        if mask is not None:
            seen = seen & mask[:, :, None]
            real = mask.sum(1).to(dtype).view(B, 1, 1).clamp(min=1)
        # A view that does not see a point samples it outside the image, where grid_sample's zero padding gives
        # exactly 0 and passes no gradient: the sums over views need no weights.
        xy = xy.masked_fill(~seen[..., None], 2.0)
        sampled = F.grid_sample(feats.flatten(0, 1), xy.flatten(0, 1)[:, None], align_corners=False)
        sampled = sampled.view(B, K, -1, xy.shape[2])  # (B, K, c, N), zero where unseen
        views = seen.sum(1, keepdim=True).to(sampled.dtype)  # (B, 1, N): how many views see each point
        mean, var = ViewStats.apply(sampled, seen[:, :, None].to(sampled.dtype), views.clamp(min=1))
        # the MLP's input (B, N, 2c + 1), written once by cat from the transposed parts
        point_in = torch.cat([mean.transpose(1, 2), var.transpose(1, 2), (views / real).transpose(1, 2)], 2)
        out = self.point(point_in).view(B, n, n, D, -1)
        # volume rendering: weight of depth d = α_d Π_{e<d} (1 - α_e)
        # α = 1 - exp(-softplus(logit)) (a density of softplus(logit)) is sigmoid(logit), and 1 - α sigmoid(-logit)
        logit = out[..., 0]
        alpha = torch.sigmoid(logit)
        clear = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), torch.sigmoid(-logit[..., :-1])], -1), -1)
        weight = alpha * clear  # (B, n, n, D)
        f = (weight[..., None] * out[..., 1:]).sum(3)
        depth = (weight * (t[:, None, None] - self.near)).sum(3, keepdim=True) / (self.far - self.near)
        r = torch.cat([f, weight.sum(3, keepdim=True), depth], -1).permute(0, 3, 1, 2)  # (B, F+2, n, n)
        return self.out(F.pixel_unshuffle(r, self.cell_rays))
