"""The scene representation networks of GQN (Eslami et al. 2018, supplementary fig. S1).

Each network f maps one context view (x_i, v_i) to r_i; the scene representation is r = Σ_i r_i over the
scene's context views. Sizes for 64x64 images and r_dim = 256:
    Pyramid: [x, v broadcast to 64x64] -> 2x2/2 convs 32, 64, 128 -> 8x8/8 conv 256            r (256, 1, 1)
    Tower:   x -> 2x2/2 conv 256 -> residual block (3x3 conv 128, 2x2/2 conv 256) -> 16x16,
             [., v broadcast to 16x16] -> residual block (3x3 convs 128, 256) -> 1x1 conv 256   r (256, 16, 16)
    Pool:    Tower, then average pooling over the 16x16 map                                     r (256, 1, 1)
All ReLU. `SceneEncoder` runs every real context view of a batch through the network in one call and sums each
scene's own views (the mask marks which of the zero-padded views are real).
"""
import torch
import torch.nn.functional as F
from torch import nn


class Pyramid(nn.Module):
    """Fig. S1 (a): the viewpoint is concatenated with the image at the input."""

    def __init__(self, x_channels=3, v_dim=7, r_dim=256, image_size=64):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"representation 'pyramid' needs an image size divisible by 8, got {image_size}")
        if r_dim < 8:
            raise ValueError(f"representation 'pyramid' needs r_dim of at least 8 (its first layer has r_dim/8 "
                             f"channels), got {r_dim}")
        self.conv1 = nn.Conv2d(x_channels + v_dim, r_dim // 8, 2, stride=2)
        self.conv2 = nn.Conv2d(r_dim // 8, r_dim // 4, 2, stride=2)
        self.conv3 = nn.Conv2d(r_dim // 4, r_dim // 2, 2, stride=2)
        self.conv4 = nn.Conv2d(r_dim // 2, r_dim, image_size // 8, stride=image_size // 8)

    def forward(self, x, v):
        """x (N, 3, H, W), v (N, 7) -> r (N, r_dim, 1, 1)."""
        v = v[:, :, None, None].expand(-1, -1, *x.shape[2:])
        r = F.relu(self.conv1(torch.cat([x, v], 1)))  # (N, 32, 32, 32)
        r = F.relu(self.conv2(r))
        r = F.relu(self.conv3(r))  # (N, 128, 8, 8)
        return F.relu(self.conv4(r))  # (N, 256, 1, 1)


class Tower(nn.Module):
    """Fig. S1 (b): two residual blocks; the viewpoint joins at 16x16, before the second."""

    def __init__(self, x_channels=3, v_dim=7, r_dim=256, image_size=64):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"representation 'tower'/'pool' needs an image size divisible by 4, got {image_size}")
        if r_dim < 2:
            raise ValueError(f"representation 'tower'/'pool' needs r_dim of at least 2 (a layer has r_dim/2 "
                             f"channels), got {r_dim}")
        self.conv1 = nn.Conv2d(x_channels, r_dim, 2, stride=2)
        self.conv2 = nn.Conv2d(r_dim, r_dim, 2, stride=2)
        self.conv3 = nn.Conv2d(r_dim, r_dim // 2, 3, padding=1)
        self.conv4 = nn.Conv2d(r_dim // 2, r_dim, 2, stride=2)
        self.conv5 = nn.Conv2d(r_dim + v_dim, r_dim, 3, padding=1)
        self.conv6 = nn.Conv2d(r_dim + v_dim, r_dim // 2, 3, padding=1)
        self.conv7 = nn.Conv2d(r_dim // 2, r_dim, 3, padding=1)
        self.conv8 = nn.Conv2d(r_dim, r_dim, 1)

    def forward(self, x, v):
        """x (N, 3, H, W), v (N, 7) -> r (N, r_dim, H/4, W/4)."""
        skip_in = F.relu(self.conv1(x))  # (N, 256, 32, 32)
        skip_out = F.relu(self.conv2(skip_in))  # (N, 256, 16, 16)
        r = F.relu(self.conv3(skip_in))  # (N, 128, 32, 32)
        r = F.relu(self.conv4(r)) + skip_out  # (N, 256, 16, 16)
        skip_in = torch.cat([r, v[:, :, None, None].expand(-1, -1, *r.shape[2:])], 1)  # (N, 263, 16, 16)
        skip_out = F.relu(self.conv5(skip_in))
        r = F.relu(self.conv6(skip_in))  # (N, 128, 16, 16)
        r = F.relu(self.conv7(r)) + skip_out
        return F.relu(self.conv8(r))  # (N, 256, 16, 16)


class Pool(Tower):
    """Fig. S1 (c): the tower followed by average pooling, which makes r independent of position."""

    def forward(self, x, v):
        """x (N, 3, H, W), v (N, 7) -> r (N, r_dim, 1, 1)."""
        return super().forward(x, v).mean((2, 3), keepdim=True)


NETWORKS = {"pyramid": Pyramid, "tower": Tower, "pool": Pool}


class SceneEncoder(nn.Module):
    """r = Σ_i f(x_i, v_i) over each scene's real context views, all views of the batch in one call."""

    def __init__(self, representation="pool", x_channels=3, v_dim=7, r_dim=256, image_size=64):
        super().__init__()
        if representation not in NETWORKS:
            raise ValueError(f"representation must be one of {', '.join(NETWORKS)} or volume, got {representation!r}")
        self.net = NETWORKS[representation](x_channels, v_dim, r_dim, image_size)
        # r's spatial size: tower 16x16 (H/4), pyramid and pool 1x1 (they reach the cores by broadcasting)
        self.r_size = image_size // 4 if representation == "tower" else 1

    def forward(self, x, v, mask=None, v_q=None):
        """x (B, M, 3, H, W), v (B, M, 7), mask bool (B, M) or None (all real) -> r (B, r_dim, h, w).

        v_q is not used: the paper's r does not depend on the query (volume.py's does)."""
        B, M = x.shape[:2]
        x, v = x.flatten(0, 1), v.flatten(0, 1)  # (B*M, 3, H, W), (B*M, 7)
        if mask is None:
            return self.net(x, v).unflatten(0, (B, M)).sum(1)
        mask = mask.flatten()
        if torch.compiler.is_compiling():
            # x[mask] has a data-dependent shape, which breaks a compiled graph: run the padding too and zero it
            r = self.net(x, v)
            r = r * mask[:, None, None, None].to(r.dtype)
            return r.unflatten(0, (B, M)).sum(1)
        real = mask.nonzero().squeeze(1)  # flat indices of the real views
        r = self.net(x[real], v[real])  # (N_real, r_dim, h, w)
        return r.new_zeros(B, *r.shape[1:]).index_add_(0, real // M, r)
