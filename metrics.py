"""The numbers a GQN is reported by: image scores of rendered views, and the ELBO in bits per dimension.

Image scores are per image, then averaged over images by the caller. MAE and RMSE are on the 0-255 scale; PSNR
(dB) and SSIM (torchmetrics' Gaussian 11x11 window, sigma 1.5) are torchmetrics' own, on the images divided by 255
(data_range 1.0). A perfect image has a PSNR of +inf (torchmetrics' value, kept: no epsilon is added), so a mean
over images that include a perfect one is inf too (a generated view, a continuous output, practically never
equals the 8-bit truth).

The ELBO (Eslami et al. 2018, eq. S9) is in nats per image; the Gaussian likelihood of pixel std σ carries a
constant that grows as σ anneals (nll_floor), which is why ports' NLL curves "plateau at ~6900" at σ = 0.7.
"""
import math

import torch


def image_errors(pred, target):
    """Per-image MAE and RMSE of pred against target, both float (B, C, H, W) on the 0-255 scale -> (B,), (B,)."""
    diff = (pred.double() - target.double()).flatten(1)
    return diff.abs().mean(1), diff.pow(2).mean(1).sqrt()


def image_scores(pred, target):
    """Per-image {"mae", "rmse", "psnr", "ssim"}, each (B,), of pred against target, float (B, 3, H, W) on 0-255."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    mae, rmse = image_errors(pred, target)
    p, t = pred.double() / 255, target.double() / 255
    return {"mae": mae, "rmse": rmse,
            "psnr": peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3)),
            "ssim": structural_similarity_index_measure(p, t, data_range=1.0, reduction="none")}


def best_of(samples, target):
    """image_scores of each image's best sample (lowest RMSE) among samples (N, B, 3, H, W), all on 0-255."""
    rmse = torch.stack([image_errors(s, target)[1] for s in samples])  # (N, B)
    return image_scores(samples[rmse.argmin(0), torch.arange(target.shape[0])], target)


def bits_per_dim(nats_per_image, dims):
    """Negative ELBO in nats per image -> bits per dimension of the 8-bit image.

    The Gaussian is a density on [0, 1]^D; discretised into 256 bins of width 1/256 its probabilities are
    the density times 256^-D, hence the 8 extra bits per dimension (the usual convention for image models).
    """
    return nats_per_image / (dims * math.log(2)) + 8.0


def nll_floor(sigma, dims):
    """The Gaussian NLL's constant part, dims * (log σ + log(2π) / 2): 6909 nats at σ 0.7 for 64x64x3 images."""
    return dims * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
