"""The numbers a GQN is reported by: image scores of rendered views, and the ELBO in bits per dimension.

Image scores are per image, then averaged over images by the caller. MAE and RMSE are on the 0-255 scale; PSNR
(dB) and SSIM (torchmetrics' Gaussian 11x11 window, sigma 1.5) are torchmetrics' own, on the images divided by 255
(data_range 1.0). A perfect image has a PSNR of +inf (torchmetrics' value, kept: no epsilon is added), so a mean
over images that include a perfect one is inf too (a generated view, a continuous output, practically never
equals the 8-bit truth).

The ELBO (Eslami et al. 2018, eq. S9) is in nats per image; the Gaussian likelihood of pixel std σ carries a
constant that grows as σ anneals (nll_floor), which is why ports' NLL curves "plateau at ~6900" at σ = 0.7.

The object score looks only where a scene's objects change the view (their pixels and their shadows), for data
that records it (the built-in rooms): the prediction's RMSE there over the empty room's, so a model that draws the
room empty scores 1 and the truth 0, whatever the sky, walls and floor around them (object_sums).
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


def nll_at(nll, sigma, other, dims):
    """The same prediction's Gaussian NLL at pixel std `other`, from its NLL at `sigma`: the squared error it holds,
    nll - floor(σ) = SSE / 2σ², does not depend on σ, so no second pass of the model is needed."""
    sse = 2 * sigma ** 2 * (nll - nll_floor(sigma, dims))
    return sse / (2 * other ** 2) + nll_floor(other, dims)


# ------------------------------------------------------------------------------------------------ draws of z
# A GQN is a conditional generative model: where the context shows the scene its draws should agree, where it does
# not they should differ, and by about as much as they are wrong. These scores ask that of N draws from the prior.
#
# Which pixels. Most of a view is background that every model gets right, with no error and no spread; pooled over
# all pixels, any spread that sits on the object correlates with the error and looks calibrated (a collapsed model
# scored a Spearman correlation of 0.95 that way). The uncertainty scores therefore use each image's informative
# pixels: where the truth or the draws' mean is more than INFORMATIVE grey levels from the mean training image (in
# any colour), i.e. where the view holds something the data set's average does not already predict.

INFORMATIVE = 10.0  # grey levels (0-255) from the mean training image
QUANTISATION_VAR = 1.0 / 12  # an 8-bit value's own variance (uniform within its grey level): the NLL's floor
FRACTIONS = torch.arange(20, dtype=torch.float64) / 20  # the sparsification curve: share of pixels removed
RESOLUTION = 1e-4  # grey levels: spreads that differ by less are rounding (float32 draws), not uncertainty, and tie
MIN_PIXELS = 20  # an image with fewer informative pixels has no sparsification curve


def informative(truth, pred, reference, levels=INFORMATIVE):
    """(B, H, W) bool: pixels where truth or pred (B, 3, H, W) differ from reference (3, H, W) by > levels."""
    far = lambda img: (img.double() - reference.double()).abs().amax(1) > levels  # noqa: E731
    return far(truth) | far(pred)


def sparsification(uncertainty, error):
    """One image's pixels, uncertainty and error (P,) -> the RMSE of the pixels left after removing the most
    uncertain share FRACTIONS of them, over the RMSE of all (F,). Pixels of equal uncertainty leave together in
    expectation (their squared errors averaged), as a random order among them would: a constant uncertainty gives
    the flat curve of a random order, 1 everywhere."""
    order = torch.argsort(uncertainty, descending=True, stable=True)
    u, e2 = uncertainty[order], error[order].double() ** 2
    _, group, counts = torch.unique_consecutive(u, return_inverse=True, return_counts=True)
    e2 = (torch.zeros(len(counts), dtype=e2.dtype).index_add_(0, group, e2) / counts)[group]
    P = len(e2)
    removed = (FRACTIONS * P).long()
    left = e2.sum() - torch.cat([e2.new_zeros(1), e2.cumsum(0)])[removed]
    rmse = (left.clamp(min=0) / (P - removed)).sqrt()
    return rmse / rmse[0]


def draw_scores(draws, truth, reference):
    """N draws (N, B, 3, H, W) of each query view, its truth (B, 3, H, W) and the mean training image (3, H, W), all
    on 0-255 -> per-image scores {name: (B,)} and sparsification curves {"model", "oracle": (B, F)} (NaN rows for
    images without a curve). Per image:
      spread             the draws' per-pixel standard deviation (RMS over colours), mean over all pixels
      informative        the share of its pixels that are informative
      spread_i, error_i  RMS over the informative pixels of the spread, and of the draws' mean's error
      in_range, in_2sd   share of informative pixel colours whose truth lies within the draws' range, and within
                         their mean +- 2 standard deviations
      nll                Gaussian NLL (nats, 0-255 scale) of the truth under the draws' mean and variance, plus the
                         8-bit quantisation's 1/12, per informative pixel colour
      spearman           Spearman's rank correlation of spread and error over the informative pixels (torchmetrics;
                         0 where the spread is constant: it ranks nothing)
    """
    from torchmetrics.functional import spearman_corrcoef

    draws, truth = draws.double(), truth.double()
    mean, var = draws.mean(0), draws.var(0, correction=0)  # (B, 3, H, W)
    spread = var.mean(1).sqrt()  # (B, H, W)
    error = (mean - truth).pow(2).mean(1).sqrt()
    mask = informative(truth, mean, reference)
    n = mask.flatten(1).sum(1).clamp(min=1)
    masked = lambda t: (t * mask).flatten(1).sum(1) / n  # noqa: E731  mean over each image's informative pixels
    inside = (draws.amin(0) <= truth) & (truth <= draws.amax(0))
    near = (truth - mean).abs() <= 2 * var.sqrt()
    nll = 0.5 * ((truth - mean) ** 2 / (var + QUANTISATION_VAR) + (var + QUANTISATION_VAR).log() + math.log(2 * math.pi))
    scores = {"spread": spread.flatten(1).mean(1), "informative": mask.flatten(1).double().mean(1),
              "spread_i": masked(spread ** 2).sqrt(), "error_i": masked(error ** 2).sqrt(),
              "in_range": masked(inside.double().mean(1)), "in_2sd": masked(near.double().mean(1)),
              "nll": masked(nll.mean(1)), "spearman": torch.zeros(len(truth), dtype=torch.float64)}
    curves = {k: torch.full((len(truth), len(FRACTIONS)), float("nan"), dtype=torch.float64)
              for k in ("model", "oracle")}
    for b in range(len(truth)):
        s, e = (spread[b][mask[b]] / RESOLUTION).round(), error[b][mask[b]]
        if len(s) >= MIN_PIXELS and e.max() > 0:
            curves["model"][b], curves["oracle"][b] = sparsification(s, e), sparsification(e, e)
        if len(s) >= 2 and s.max() > s.min() and e.max() > e.min():
            scores["spearman"][b] = spearman_corrcoef(s, e)
    return scores, curves


def latent_verdict(deterministic, best_of_ratio, spread_to_error):
    """What N draws of z say about the latent: "deterministic" (no spread at all), "collapsed" (the draws are one
    image: the best of them gains under 1% on their mean, and their spread is under a twentieth of its error),
    "imagines" (the best draw is at least 5% better than the mean and the spread at least a fifth of its error),
    else "weak"."""
    if deterministic:
        return "deterministic"
    if best_of_ratio > 0.99 and spread_to_error < 0.05:
        return "collapsed"
    if best_of_ratio <= 0.95 and spread_to_error >= 0.2:
        return "imagines"
    return "weak"


def object_sums(pred, truth, empty, weight):
    """Squared errors over the pixels a scene's objects change: images (B, 3, H, W) in [0, 1], weight (B, 1, H, W)
    the share of each pixel that the objects or their shadows cover -> (the prediction's sum, the empty room's sum,
    the weights' sum). The one expression serves both, so a prediction that is the empty room gives its sum exactly."""
    def errors(image):
        return (weight * (image - truth) ** 2).sum().item()

    return errors(pred), errors(empty), 3 * weight.sum().item()
