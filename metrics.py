"""The numbers a GQN is reported by: image errors of rendered views, and the ELBO in bits per dimension.

The ELBO (Eslami et al. 2018, eq. S9) is in nats per image; the Gaussian likelihood of pixel std σ carries a
constant that grows as σ anneals (nll_floor), which is why ports' NLL curves "plateau at ~6900" at σ = 0.7.
"""
import math


def image_errors(pred, target):
    """Per-image MAE and RMSE of pred against target, both float (B, C, H, W) on the 0-255 scale -> (B,), (B,)."""
    diff = (pred.double() - target.double()).flatten(1)
    return diff.abs().mean(1), diff.pow(2).mean(1).sqrt()


def bits_per_dim(nats_per_image, dims):
    """Negative ELBO in nats per image -> bits per dimension of the 8-bit image.

    The Gaussian is a density on [0, 1]^D; discretised into 256 bins of width 1/256 its probabilities are
    the density times 256^-D, hence the 8 extra bits per dimension (the usual convention for image models).
    """
    return nats_per_image / (dims * math.log(2)) + 8.0


def nll_floor(sigma, dims):
    """The Gaussian NLL's constant part, dims * (log σ + log(2π) / 2): 6909 nats at σ 0.7 for 64x64x3 images."""
    return dims * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
