"""The GQN computed the straightforward way: the reference that model.py's fast computation must equal.

Eslami et al. 2018, figure S2 and the step equations in model.py's docstring, taken literally on a GQN's own
weights: the representation network run view by view in a Python loop, the cores' inputs concatenated again at
every step, four separate gate convolutions per ConvLSTM, the 64x64 canvas built and downsampled at every step,
float32. tests/test_fast_path.py checks that model.py gives the same ELBO and gradients; bench.py times both.
"""
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from model import ELBO


def _gate_convs(inp, gates):
    """The paper's four gate convolutions (f, i, o, s), one at a time; gates = [(weight, bias)] * 4."""
    return [F.conv2d(inp, w, b, padding=w.shape[-1] // 2) for w, b in gates]


def _lstm(gates, c):
    f, i, o, s = gates
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(s)
    return c, torch.sigmoid(o) * torch.tanh(c)


def reference_r(model, x, v, mask=None):
    """The representation one view at a time, summed per scene -> r (B, r_dim, 16 or 1, 16 or 1)."""
    net = model.representation.net
    rs = []
    for b in range(x.shape[0]):
        r_b = 0
        for i in range(x.shape[1]):
            if mask is None or mask[b, i]:
                r_b = r_b + net(x[b, i:i + 1], v[b, i:i + 1])
        rs.append(r_b)
    return torch.cat(rs)


def gate_weights(core, lead, n, spatial, vd):
    """Per layer of n: the four gates' (weight, bias) over [lead-in spatial channels, v, r, per-step inputs, h].

    Cut once per forward pass with chunk/split (whose backward is one concatenation), as a model with separate
    per-gate parameters would hold them; the cutting costs a copy of the weights, nothing per step.
    """
    wb = core.invariant_broadcast.weight.chunk(n, 0)
    wi = core.invariant.weight.chunk(n, 0) if core.invariant is not None else [None] * n
    layers = []
    for k in range(n):
        w_r = wi[k][:, lead:] if spatial else wb[k][:, vd:]
        parts = ([wi[k][:, :lead]] if lead else []) + [wb[k][:, :vd], w_r, core.cells[k].gates.weight]
        layers.append(list(zip(torch.cat(parts, 1).chunk(4, 0), core.cells[k].gates.bias.chunk(4, 0))))
    return layers


def reference_run(model, x, v, v_q, x_q, noise, mask=None):
    """The GQN's L steps computed the straightforward way on `model`'s weights -> (KL of each step (B, L) or None,
    mean image).

    Follows the step equations in model.py's docstring literally: the weights of each layer's gate convolution
    are the model's fused ones, cut back into the paper's layout [invariant inputs, per-step inputs, h] and into
    four gates; D_l and T_l are the model's stacked 4x4/4 (transposed) convolutions, sliced per layer. With x_q,
    z_l comes from the posterior (noise = eps); with x_q None, from the prior (generation).
    """
    cfg = model.config
    B = x.shape[0]
    L, h, u_dim, xc, vd = cfg["L"], cfg["h_dim"], cfg["u_dim"], cfg["x_channels"], cfg["v_dim"]
    s = cfg["image_size"] // 4
    zg = cfg.get("z_grid", 0)
    # z_grid: a head's map averaged over each block of s/zg x s/zg cells
    coarse = (lambda t: t.unflatten(2, (zg, s // zg)).unflatten(4, (zg, s // zg)).mean((3, 5))) if zg else (lambda t: t)

    r = reference_r(model, x, v, mask)  # (B, r_dim, 16 or 1, 16 or 1)
    spatial = r.shape[-1] > 1
    ic, gc = model.inference_core, model.generation_core
    n = 1 if cfg["shared_core"] else L
    gates_e, gates_g = gate_weights(ic, xc, n, spatial, vd), gate_weights(gc, 0, n, spatial, vd)
    D, T = ic.downsample_u.weight.chunk(n, 0), gc.upsample.weight.chunk(n, 0)

    u = v_q.new_zeros(B, u_dim, 4 * s, 4 * s)  # the canvas (B, 128, 64, 64)
    zeros = v_q.new_zeros(B, h, s, s)
    c_g, h_g, c_e, h_e = zeros, zeros, zeros, zeros
    kl = []
    for l in range(L):
        k = 0 if cfg["shared_core"] else l
        # the step's inputs, broadcast and concatenated again at every step
        v_up = v_q[:, :, None, None].expand(-1, -1, s, s)
        r_up = r.expand(-1, -1, s, s)
        mu_p, logstd_p = coarse(model.prior(h_g)).chunk(2, 1)
        if x_q is None:
            z = mu_p + logstd_p.exp() * noise[:, l]
        else:
            x_down = F.conv2d(x_q, ic.downsample_x.weight, stride=4)
            u_down = F.conv2d(u, D[k], stride=4)
            c_e, h_e = _lstm(_gate_convs(torch.cat([x_down, v_up, r_up, h_g, u_down, h_e], 1), gates_e[k]), c_e)
            mu_q, logstd_q = coarse(model.posterior(h_e)).chunk(2, 1)
            z = mu_q + logstd_q.exp() * noise[:, l]
            kl.append(kl_divergence(Normal(mu_q, logstd_q.exp()), Normal(mu_p, logstd_p.exp())).sum((1, 2, 3)))
        if zg:  # z_l's cell (i, j) is the state's cells (i*f..i*f+f-1, j*f..j*f+f-1)
            z = z.repeat_interleave(s // zg, 2).repeat_interleave(s // zg, 3)
        c_g, h_g = _lstm(_gate_convs(torch.cat([v_up, r_up, z, h_g], 1), gates_g[k]), c_g)
        u = u + F.conv_transpose2d(h_g, T[k], stride=4)
    logit = model.observation(u)
    if model.image_from_r is not None:
        logit = logit + model.image_from_r(r.expand(-1, -1, s, s))
    return (torch.stack(kl, 1) if x_q is not None else None), torch.sigmoid(logit)


def reference_elbo(model, x, v, v_q, x_q, sigma, mask=None, eps=None):
    """model(x, v, v_q, x_q, sigma, mask, eps) computed the straightforward way -> ELBO(elbo, kl, nll, kl_steps)."""
    if eps is None:
        eps = torch.randn(x.shape[0], *model.noise_shape, dtype=x_q.dtype, device=x_q.device)
    kl_steps, mean = reference_run(model, x, v, v_q, x_q, eps, mask)
    kl, nll = kl_steps.sum(1), -Normal(mean, sigma).log_prob(x_q).sum((1, 2, 3))
    return ELBO(-(kl + nll), kl, nll, kl_steps)
