"""The Generative Query Network (Eslami et al. 2018, Science; supplementary section 2, figs. S1 and S2).

Names, as in the paper:
    x, v        context images (B, M, 3, H, W) in [0, 1] and viewpoints (B, M, 7); mask (B, M) marks real views
    x_q, v_q    query image (B, 3, H, W) and viewpoint (B, 7)
    r           scene representation, Σ over context views of f(x_i, v_i) (representation.py, fig. S1), or with
                representation "volume" the context read along the query camera's rays (volume.py)
    h_g, c_g    generation core state; h_e, c_e inference core state (core.py, fig. S2), 128x16x16
    u           canvas, 128x64x64; z latent 3x16x16 per step; L steps; sigma the pixel standard deviation
    η_π, η_q    prior and posterior heads: 5x5 convolutions of h_g and h_e to the mean and log std of z_l
                (kernel_size, as the cores' gate convolutions)
    η_g         observation head: mean of x_q = sigmoid(1x1 conv of u^L)
    η_r         with image_from_r (not in the paper; the `cpu` preset's): a 4x4/4 transposed convolution of r
                added to η_g's logit, zero at the start: a path from r straight to the image

Per step l = 0..L-1 (h_g^0 = h_e^0 = c = u^0 = 0):
    prior     π(z_l) = N(η_π(h_g^l))                           from the state before this step's update
    inference (c_e, h_e)^{l+1} = C_e^l(x_q, v_q, r, (c_e, h_e)^l, h_g^l, u^l)
    posterior q(z_l) = N(η_q(h_e^{l+1})),  z_l = mean + std * eps_l
    generator (c_g, h_g)^{l+1} = C_g^l(v_q, r, z_l, (c_g, h_g)^l),  u^{l+1} = u^l + T_l(h_g^{l+1})
ELBO = log N(x_q | η_g(u^L), sigma^2) - Σ_l KL(q(z_l) || π(z_l)), in nats per image, the KL analytic. Generation
runs the same loop without the inference core and draws z_l from the prior.

η_r: in the paper's loop, what r says about the query image reaches it only through L LSTM steps and the canvas,
and a small model on a CPU budget spends thousands of steps learning to carry it there (colours above all); with
the path η_r, the `volume` representation's rendering of the query view shows in the image from the first steps,
and the cores learn what it misses. The `cpu` preset's default job scores 0.66x instead of 0.85x at 3 context views
after 3000 steps (docs/default-run.md).

z_grid (not in the paper): z_l on a coarser grid than the cores' state, z_grid x z_grid; the heads' means and log
stds are averaged over each block of the state's grid, and z_l is repeated over its block on the way into C_g. One
draw then differs from another by a few choices that span the image, not by many local ones.

The function is exactly that; the computation exploits linearity (core.py explains): the step-invariant inputs
pass through their share of every gate convolution once per forward pass, the zero initial state skips its
convolutions, and the canvas enters only through D_l∘T_j (1x1 convolutions at 16x16) and η_g∘T_j (one transposed
convolution at the end), so the 64x64 canvas is never built. reference.py holds the straightforward computation and
tests/test_fast_path.py checks that both give the same ELBO and gradients on the same weights.
"""
from collections import namedtuple
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core import GenerationCore, InferenceCore, tap_product
from representation import SceneEncoder
from volume import CELL_RAYS, SAMPLES, Volume

# elbo, kl, nll (B,) in nats per image, elbo = -(kl + nll); kl_steps (B, L): KL(q(z_l) || π(z_l)) of each step l
ELBO = namedtuple("ELBO", ["elbo", "kl", "nll", "kl_steps"], defaults=(None,))
# A scene's context views as generation needs them (GQN.encode_context): r, or volume's features, cameras and mask
Context = namedtuple("Context", ["r", "features", "v", "mask"])


def _f32(t):
    """Half-precision tensors (autocast) to float32; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def gaussian_kl(mu_q, logstd_q, mu_p, logstd_p):
    """KL(N(mu_q, e^logstd_q) || N(mu_p, e^logstd_p)) summed over (C, H, W) -> (B,), in float32 or wider."""
    mu_q, logstd_q, mu_p, logstd_p = map(_f32, (mu_q, logstd_q, mu_p, logstd_p))
    kl = logstd_p - logstd_q + ((2 * logstd_q).exp() + (mu_q - mu_p) ** 2) / (2 * (2 * logstd_p).exp()) - 0.5
    return kl.sum((1, 2, 3))


class _GradShare(torch.autograd.Function):
    """t itself in the forward pass; in the backward, its gradient times `share`."""

    @staticmethod
    def forward(ctx, t, share):
        ctx.share = share
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.share, None


def balanced_kl(mu_q, logstd_q, mu_p, logstd_p, balance=0.5):
    """gaussian_kl's value, its gradient split by KL balancing (Hafner et al. 2021, DreamerV2): 2 * balance of it
    trains the prior towards the posterior, 2 * (1 - balance) the posterior towards the prior. 0.5 is the ELBO's own
    gradient; more learns the prior faster than the posterior is pulled back to it, so z is used sooner and more."""
    if balance == 0.5 or not torch.is_grad_enabled():
        return gaussian_kl(mu_q, logstd_q, mu_p, logstd_p)
    q, p = 2 * (1 - balance), 2 * balance
    return gaussian_kl(_GradShare.apply(mu_q, q), _GradShare.apply(logstd_q, q),
                       _GradShare.apply(mu_p, p), _GradShare.apply(logstd_p, p))


def gaussian_nll(x, mean, sigma):
    """-log N(x | mean, sigma^2) summed over (C, H, W) -> (B,), in float32 or wider; sigma a float or tensor."""
    mean = _f32(mean)
    x = x.to(mean.dtype)
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    nll = (x - mean) ** 2 / (2 * sigma ** 2) + sigma.log() + 0.5 * math.log(2 * math.pi)
    return nll.sum((1, 2, 3))


def objective(out, beta=1.0, free_bits=0.0):
    """The per-scene training loss (B,) from forward's ELBO: NLL + beta * Σ_l max(KL_l, free_bits).

    With beta 1 and no free bits it is the paper's -ELBO. Against posterior collapse (the posterior gives up on z when
    its KL costs more than z saves the likelihood early in training): KL warm-up (Sønderby et al. 2016) weighs the
    KL by beta < 1 at first (scheduler.kl_weight); free bits (Kingma et al. 2016) leave each step's KL unpenalised
    below `free_bits` nats, per scene, so that every scene's share of the loss is its own (a batch split over threads
    and ranks computes the same loss).
    """
    kl = out.kl_steps.float()
    if free_bits > 0:
        kl = kl.clamp(min=free_bits)
    return out.nll.float() + beta * kl.sum(1)


class GQN(nn.Module):
    """Generative Query Network: representation network + L-step inference/generation cores."""

    def __init__(self, representation="pool", L=12, shared_core=False, x_channels=3, v_dim=7, r_dim=256,
                 h_dim=128, z_dim=3, u_dim=128, image_size=64, checkpoint_activations=False,
                 fov=20.0, near=2.7, far=3.97, kernel_size=5, image_from_r=False, depth_samples=SAMPLES,
                 z_grid=0, cell_rays=CELL_RAYS):
        super().__init__()
        self.config = dict(representation=representation, L=L, shared_core=shared_core, x_channels=x_channels,
                           v_dim=v_dim, r_dim=r_dim, h_dim=h_dim, z_dim=z_dim, u_dim=u_dim, image_size=image_size,
                           checkpoint_activations=checkpoint_activations, kernel_size=kernel_size,
                           image_from_r=image_from_r)
        if z_grid:  # recorded where it is used: the paper's z needs no key (and older checkpoints have none)
            self.config.update(z_grid=z_grid)
        if representation == "volume":  # only this one has cameras: fov and depths would mislead elsewhere
            self.config.update(fov=fov, near=near, far=far, depth_samples=depth_samples)
            if cell_rays != CELL_RAYS:  # recorded where it differs: older checkpoints have none
                self.config.update(cell_rays=cell_rays)
        if L < 1:
            raise ValueError(f"L (the number of generation steps) must be at least 1, got {L}")
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (the cores run at image_size/4), got {image_size}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the state keeps its size), got {kernel_size}")
        if z_grid < 0 or (z_grid and (image_size // 4) % z_grid):
            raise ValueError(f"z_grid must divide the cores' grid of image_size/4 = {image_size // 4}, got {z_grid}")
        self.L, self.shared_core, self.z_dim, self.h_dim, self.u_dim = L, shared_core, z_dim, h_dim, u_dim
        self.z_grid = z_grid  # 0: z on the cores' grid, the paper's
        self.image_size = image_size
        self.checkpoint_activations = checkpoint_activations
        if representation == "volume":
            self.representation = Volume(x_channels, r_dim, image_size, fov, near, far, depth_samples, cell_rays)
        else:
            self.representation = SceneEncoder(representation, x_channels, v_dim, r_dim, image_size)
        r_spatial = self.representation.r_size > 1
        n = 1 if shared_core else L
        k = kernel_size  # the paper's 5x5 for every convolution of the state
        self.inference_core = InferenceCore(n, x_channels, v_dim, r_dim, r_spatial, h_dim, u_dim, k)
        self.generation_core = GenerationCore(n, v_dim, r_dim, r_spatial, z_dim, h_dim, u_dim, k)
        self.prior = nn.Conv2d(h_dim, 2 * z_dim, k, padding=k // 2)  # η_π: h_g -> (mean, log std) of z
        self.posterior = nn.Conv2d(h_dim, 2 * z_dim, k, padding=k // 2)  # η_q: h_e -> (mean, log std) of z
        self.observation = nn.Conv2d(u_dim, x_channels, 1)  # η_g: u -> logit of the mean of x_q
        self.image_from_r = None  # η_r: r -> a term of that logit, zero at the start: training starts as the paper's
        if image_from_r:
            self.image_from_r = nn.ConvTranspose2d(r_dim, x_channels, 4, stride=4)
            nn.init.zeros_(self.image_from_r.weight)
            nn.init.zeros_(self.image_from_r.bias)

    @property
    def noise_shape(self):
        """Shape of one scene's posterior noise eps: (L, z_dim, H/4, W/4), or z_grid x z_grid."""
        s = self.z_grid or self.image_size // 4
        return (self.L, self.z_dim, s, s)

    def _on_z_grid(self, head):
        """A head's (mean, log std) of z on the cores' grid, averaged over blocks onto z's own grid (z_grid)."""
        return F.adaptive_avg_pool2d(head, self.z_grid) if self.z_grid else head

    def _z_to_cores(self, z, size):
        """z on the cores' grid: each of its z_grid x z_grid cells repeated over its block."""
        return F.interpolate(z, scale_factor=size // self.z_grid, mode="nearest") if self.z_grid else z

    def training_noise(self):
        """Every random input of one scene's forward pass in training, by forward's keyword -> (kind, shape): the
        posterior's eps (normal) and, for `volume`, its depth jitter (uniform). train.py has the data draw them as
        pure functions of (seed, step, scene) (sampling.TrainBatches), so that a step computes the same thing
        whatever the rank, the world size, the batch's split over threads or where the run was resumed."""
        noise = {"eps": ("normal", self.noise_shape)}
        if isinstance(self.representation, Volume):
            noise["depth_noise"] = ("uniform", (self.representation.samples,))
        return noise

    # ------------------------------------------------------------------------------------------ the L steps

    def _canvas_seen(self, l, canvas):
        """D_l(u^l), the inference core's 4x4/4 view of the canvas, from the generator states so far.

        u^l = Σ_{j<l} T_j(h_g^{j+1}), so D_l(u^l) = Σ_j (D_l∘T_j)(h_g^{j+1}), each D_l∘T_j a 1x1 convolution.
        canvas: Σ_j h_g^{j+1} (shared cores: one T and one D) or the list [h_g^1, ..., h_g^l] (unshared).
        """
        D, T = self.inference_core.downsample_u.weight, self.generation_core.upsample.weight
        if self.shared_core:
            return F.conv2d(canvas, tap_product(D, T)[:, :, None, None])
        u, h = self.u_dim, self.h_dim
        M = tap_product(D[l * u:(l + 1) * u], T[:l * h])  # (u, l*h): D_l∘T_j for j < l side by side
        return F.conv2d(torch.cat(canvas, 1), M[:, :, None, None])  # (B, u, 16, 16)

    def _step(self, l, g_in, e_in, state_g, state_e, canvas, noise, kl_balance=0.5):
        """Step l of the loop in the module docstring -> (state_g, state_e, KL_l (B,) or None)."""
        k = 0 if self.shared_core else l
        if state_g is None:  # h_g^0 = 0: η_π gives its bias
            B, _, s, _ = g_in[k].shape
            prior = self.prior.bias.view(1, -1, 1, 1).expand(B, -1, s, s)
        else:
            prior = self.prior(state_g[1])
        mu_p, logstd_p = self._on_z_grid(prior).chunk(2, 1)
        kl = None
        if e_in is None:  # generation: z from the prior
            z = mu_p + logstd_p.exp() * noise
        else:
            # h_g^0 = u^0 = 0 as well: at l = 0 only the invariant share and the bias drive C_e
            inp = None if state_g is None else torch.cat([state_g[1], self._canvas_seen(l, canvas)], 1)
            state_e = self.inference_core.cells[k](inp, state_e, e_in[k])
            mu_q, logstd_q = self._on_z_grid(self.posterior(state_e[1])).chunk(2, 1)
            z = mu_q + logstd_q.exp() * noise
            kl = balanced_kl(mu_q, logstd_q, mu_p, logstd_p, kl_balance)
        state_g = self.generation_core.cells[k](self._z_to_cores(z, g_in[k].shape[-1]), state_g, g_in[k])
        return state_g, state_e, kl

    def _run(self, r, v_q, x_q, noise, kl_balance=0.5):
        """The L steps; with x_q z comes from the posterior (noise = its eps), without it from the prior.

        -> (KL of each step (B, L), or None; observation mean (B, 3, H, W) in [0, 1]).
        """
        size = self.image_size // 4
        g_in = self.generation_core.invariant_gates(v_q, r, size)  # per layer (B, 4h, 16, 16)
        e_in = None if x_q is None else self.inference_core.invariant_gates(x_q, v_q, r)
        state_g = state_e = None
        canvas = 0 if self.shared_core else []
        kl = []
        for l in range(self.L):
            args = (l, g_in, e_in, state_g, state_e, canvas, noise[:, l], kl_balance)
            if self.checkpoint_activations and torch.is_grad_enabled():
                # recompute the step in the backward pass: keeps only each step's inputs alive
                state_g, state_e, kl_l = checkpoint(self._step, *args, use_reentrant=False)
            else:
                state_g, state_e, kl_l = self._step(*args)
            if kl_l is not None:
                kl.append(kl_l)
            h_g = state_g[1]
            canvas = canvas + h_g if self.shared_core else canvas + [h_g]
        # η_g(u^L) = η_g(Σ_l T_l(h_g^{l+1})): one transposed convolution of the h_g's with the weights η_g∘T_l
        T = self.generation_core.upsample.weight  # (n*h, u, 4, 4)
        W = torch.einsum("icab,xc->ixab", T, self.observation.weight[:, :, 0, 0])  # (n*h, 3, 4, 4)
        h = canvas if self.shared_core else torch.cat(canvas, 1)
        logit = F.conv_transpose2d(h, W, self.observation.bias, stride=4)  # (B, 3, 64, 64)
        if self.image_from_r is not None:
            logit = logit + self.image_from_r(r.expand(-1, -1, size, size))  # the pool representation's r is 1x1
        mean = torch.sigmoid(logit)
        return (torch.stack(kl, 1) if x_q is not None else None), mean

    # ------------------------------------------------------------------------------------------ the API

    def _check(self, x, v, v_q, x_q=None, mask=None):
        """Shapes a caller can get wrong, as one clear ValueError instead of a convolution's shape error."""
        S = self.image_size
        if x.dim() != 5 or tuple(x.shape[2:]) != (self.config["x_channels"], S, S):
            raise ValueError(f"x has shape {tuple(x.shape)}; the model expects (B, M, {self.config['x_channels']}, "
                             f"{S}, {S}) (it was built with image_size={S})")
        B, M = x.shape[:2]
        if tuple(v.shape) != (B, M, self.config["v_dim"]) or tuple(v_q.shape) != (B, self.config["v_dim"]):
            raise ValueError(f"v {tuple(v.shape)} and v_q {tuple(v_q.shape)} must be (B, M, 7) and (B, 7) for x "
                             f"{tuple(x.shape)}")
        if x_q is not None and tuple(x_q.shape) != (B, *x.shape[2:]):
            raise ValueError(f"x_q has shape {tuple(x_q.shape)}; expected {(B, *x.shape[2:])}")
        if mask is not None and tuple(mask.shape) != (B, M):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (B, M) = {(B, M)}")

    def forward(self, x, v, v_q, x_q, sigma, mask=None, eps=None, depth_noise=None, kl_balance=0.5):
        """-> ELBO(elbo, kl, nll, kl_steps): (B,) float32 in nats per image, and each step's KL (B, L); the paper's loss
        is -elbo.mean() (objective() adds KL warm-up and free bits).

        x (B, M, 3, H, W) in [0, 1], v (B, M, 7), v_q (B, 7), x_q (B, 3, H, W) in [0, 1], sigma pixel std,
        mask bool (B, M) (None: all views real), eps (B, L, z, H/4, W/4) posterior noise (None: drawn here),
        depth_noise: representation "volume" in training, its depth jitter (B, D) uniform in [0, 1) (None: drawn
        here). Noise drawn by the caller (training_noise) makes a step a function of its batch alone. kl_balance:
        how the KL's gradient is shared between prior and posterior (balanced_kl; 0.5: the ELBO's), values unchanged.
        """
        self._check(x, v, v_q, x_q, mask)
        if eps is not None and tuple(eps.shape[1:]) != self.noise_shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)}; expected (B, *model.noise_shape) = "
                             f"(B, {', '.join(map(str, self.noise_shape))})")
        r = self.representation(x, v, mask, v_q, **({} if depth_noise is None else {"noise": depth_noise}))
        if eps is None:
            eps = torch.randn(x_q.shape[0], *self.noise_shape, device=x_q.device, dtype=x_q.dtype)
        kl_steps, mean = self._run(r, v_q, x_q, eps, kl_balance)
        kl, nll = kl_steps.sum(1), gaussian_nll(x_q, mean, sigma)
        return ELBO(-(kl + nll), kl, nll, kl_steps)

    @torch.no_grad()
    def generate(self, x, v, v_q, mask=None, generator=None):
        """Image (B, 3, H, W) in [0, 1] seen from v_q: the observation mean, z drawn from the prior."""
        self._check(x, v, v_q, None, mask)
        return self.generate_from(self.encode_context(x, v, mask), v_q, generator)

    @torch.no_grad()
    def encode_context(self, x, v, mask=None):
        """What generation needs of B scenes' context views, whatever the query camera -> Context: r itself for the
        paper's representations (Σ_i f(x_i, v_i) does not depend on v_q), the context views' features and cameras
        for `volume` (whose r reads them along each query's rays). A viewer computes it once per scene."""
        if isinstance(self.representation, Volume):
            return Context(None, self.representation.features(x, mask), v, mask)
        return Context(self.representation(x, v, mask), None, None, None)

    @torch.no_grad()
    def generate_from(self, context, v_q, generator=None):
        """generate() for query cameras v_q (Q, 7) of encode_context's scenes: Q = B, or any Q for one scene."""
        Q = v_q.shape[0]
        if context.r is not None:
            r = context.r.expand(Q, *context.r.shape[1:])
        else:
            grow = lambda t: None if t is None else t.expand(Q, *t.shape[1:])  # noqa: E731  one scene, Q cameras
            r = self.representation.read(grow(context.features), grow(context.v), grow(context.mask), v_q)
        noise = torch.randn(Q, *self.noise_shape, generator=generator, device=v_q.device, dtype=v_q.dtype)
        return self._run(r, v_q, None, noise)[1]

    @torch.no_grad()
    def reconstruct(self, x, v, v_q, x_q, mask=None, generator=None):
        """Image (B, 3, H, W) in [0, 1]: the observation mean with z drawn from the posterior given x_q."""
        self._check(x, v, v_q, x_q, mask)
        r = self.representation(x, v, mask, v_q)
        noise = torch.randn(v_q.shape[0], *self.noise_shape, generator=generator, device=v_q.device, dtype=x.dtype)
        return self._run(r, v_q, x_q, noise)[1]

# ----------------------------------------------------------------------------------------------------------------
# The model's input: images as the model takes them

def resize(x, size):
    """Images (..., C, H, W) -> float (..., C, size, size), area interpolation when the sizes differ.

    Area interpolation averages whole pixels, as a camera of lower resolution would see the scene; training,
    evaluation and rendering all resize this way, so a model sees at test time what it saw in training.
    """
    x = x.float()
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    lead = x.shape[:-3]
    x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(size, size), mode="area")
    return x.reshape(*lead, *x.shape[-3:])


def to_model(images, size, device):
    """uint8 images (..., 3, H, W) -> float in [0, 1] on device at the model's size (resize)."""
    return resize(images.to(device, non_blocking=True).float().div_(255), size)
