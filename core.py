"""The inference and generation cores of GQN (Eslami et al. 2018, supplementary fig. S2).

Generation core C_g^l: a ConvLSTM whose input is (v_q, r, z_l) and state (c_g, h_g) 128x16x16; after each step
the canvas u (128x64x64) grows by a 4x4, stride-4 transposed convolution of h_g.
Inference core C_e^l: a ConvLSTM whose input is (x_q, v_q, r, h_g, u) and state (c_e, h_e); x_q and u enter
through 4x4, stride-4 convolutions. v_q (and r when it is 1x1) reach 16x16 by broadcasting, as in the paper:
no learned upsampling. With shared cores one C_e and one C_g serve all L steps; otherwise there are L of each.

How the weights are laid out, and why (the function is the paper's; the layout makes it cheap):
- A convolution of a concatenation is the sum of the convolutions of its parts. The gate convolution of each
  cell is split into the step-invariant inputs (x_q, v_q, r), which `invariant_gates` convolves once per forward
  pass for all layers at once (the layers' weights are stacked on the output axis of one Conv2d), and the
  per-step inputs plus h, which the ConvLSTMCell convolves at every step.
- A broadcast input (v_q, a 1x1 r) is constant over the map, so its convolution is `broadcast_conv`: a product
  with the 0/1 matrix of kernel taps that fall inside the image, instead of a 5x5 convolution over 16x16.
- The canvas is linear in h_g: u^l = Σ_{j<l} T_j(h_g^{j+1}). T_j (4x4/4 transposed) and the inference core's D_l
  (4x4/4) tile the same 4x4 blocks, so D_l∘T_j is a 1x1 convolution (`tap_product`), and the observation
  η_g(u^L) is one transposed convolution of [h_g^1..h_g^L]. model.py uses both, and never builds the 64x64 canvas.
"""
import torch
import torch.nn.functional as F
from torch import nn

from conv_lstm import ConvLSTMCell


def broadcast_conv(c, weight, size):
    """conv2d(c broadcast to a size x size map, weight, padding=k//2) without building the map.

    c (B, C), weight (O, C, k, k) -> (B, O, size, size). Each output pixel sums W[:, :, tap] @ c over the taps that
    fall inside the image: the per-tap products (B, O, k*k) times the 0/1 tap-validity matrix (k*k, size*size).
    """
    k = weight.shape[-1]
    valid = F.unfold(c.new_ones(1, 1, size, size), k, padding=k // 2)[0]  # (k*k, size*size)
    taps = torch.einsum("bc,ocq->boq", c, weight.flatten(2))  # (B, O, k*k)
    return (taps @ valid.to(taps.dtype)).unflatten(2, (size, size))


def stacked_conv(conv, x, n):
    """conv(x) for a Conv2d whose output channels stack n layers' weights -> n tensors, one per layer.

    One convolution on GPUs (one launch, one large GEMM). On the CPU one convolution per layer: the 5x5 weights of
    all L layers (80 MB at the paper's sizes) do not stay in cache, and per-layer slices measured ~15% faster.
    """
    if x.device.type != "cpu":
        return conv(x).chunk(n, 1)
    return [F.conv2d(x, w, padding=conv.padding) for w in conv.weight.chunk(n, 0)]


def tap_product(down, up):
    """1x1-conv weight (o, i) of D∘T: D a 4x4/4 conv weight (o, c, 4, 4), T a 4x4/4 transposed conv (i, c, 4, 4)."""
    return torch.einsum("ocab,icab->oi", down, up)


class InferenceCore(nn.Module):
    """C_e for n = 1 (shared) or L layers: ConvLSTM over [x_q↓, v_q, r, h_g, u↓] with state (c_e, h_e)."""

    def __init__(self, n, x_channels=3, v_dim=7, r_dim=256, r_spatial=False, h_dim=128, u_dim=128, kernel_size=5):
        super().__init__()
        self.n, self.r_spatial = n, r_spatial
        k, p = kernel_size, kernel_size // 2
        self.downsample_x = nn.Conv2d(x_channels, x_channels, 4, stride=4, bias=False)
        # D_l of every layer, stacked on the output axis: weight (n*u, u, 4, 4)
        self.downsample_u = nn.Conv2d(u_dim, n * u_dim, 4, stride=4, bias=False)
        # the step-invariant share of every layer's gate convolution, stacked on the output axis (n*4h)
        self.invariant = nn.Conv2d(x_channels + (r_dim if r_spatial else 0), n * 4 * h_dim, k, padding=p, bias=False)
        self.invariant_broadcast = nn.Conv2d(v_dim + (0 if r_spatial else r_dim), n * 4 * h_dim, k, padding=p,
                                             bias=False)
        # per step: input [h_g, u↓], hidden h_e (the gate bias lives here)
        self.cells = nn.ModuleList(ConvLSTMCell(h_dim + u_dim, h_dim, k) for _ in range(n))

    def invariant_gates(self, x_q, v_q, r):
        """x_q (B, 3, H, W), v_q (B, 7), r (B, r_dim, h, w or 1) -> n gate addends (B, 4h, H/4, W/4), one per layer."""
        x = self.downsample_x(x_q)  # (B, 3, 16, 16)
        if self.r_spatial:
            spatial, flat = torch.cat([x, r], 1), v_q
        else:
            spatial, flat = x, torch.cat([v_q, r.flatten(1)], 1)
        flat = broadcast_conv(flat, self.invariant_broadcast.weight, x.shape[-1]).chunk(self.n, 1)
        return [a + b for a, b in zip(stacked_conv(self.invariant, spatial, self.n), flat)]


class GenerationCore(nn.Module):
    """C_g for n = 1 (shared) or L layers: ConvLSTM over [v_q, r, z] with state (c_g, h_g), and the canvas update."""

    def __init__(self, n, v_dim=7, r_dim=256, r_spatial=False, z_dim=3, h_dim=128, u_dim=128, kernel_size=5):
        super().__init__()
        self.n, self.r_spatial = n, r_spatial
        k, p = kernel_size, kernel_size // 2
        self.invariant = nn.Conv2d(r_dim, n * 4 * h_dim, k, padding=p, bias=False) if r_spatial else None
        self.invariant_broadcast = nn.Conv2d(v_dim + (0 if r_spatial else r_dim), n * 4 * h_dim, k, padding=p,
                                             bias=False)
        # per step: input z, hidden h_g (the gate bias lives here)
        self.cells = nn.ModuleList(ConvLSTMCell(z_dim, h_dim, k) for _ in range(n))
        # T_l of every layer, stacked on the input axis: weight (n*h, u, 4, 4), so that one transposed convolution
        # of [h_1, ..., h_n] is Σ_l T_l(h_l)
        self.upsample = nn.ConvTranspose2d(n * h_dim, u_dim, 4, stride=4, bias=False)

    def invariant_gates(self, v_q, r, size):
        """v_q (B, 7), r (B, r_dim, size or 1, .) -> n gate addends (B, 4h, size, size), one per layer."""
        if not self.r_spatial:
            return broadcast_conv(torch.cat([v_q, r.flatten(1)], 1), self.invariant_broadcast.weight, size).chunk(
                self.n, 1)
        flat = broadcast_conv(v_q, self.invariant_broadcast.weight, size).chunk(self.n, 1)
        return [a + b for a, b in zip(stacked_conv(self.invariant, r, self.n), flat)]
