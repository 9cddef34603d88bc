"""The paper's annealing schedules, as pure functions of the training step.

Eslami et al. 2018, supplementary section "Training": Adam's learning rate mu is annealed linearly from
mu_i = 5e-4 to mu_f = 5e-5 over the first 1.6M steps, and the pixel standard deviation sigma of the Gaussian
likelihood linearly from sigma_i = 2.0 to sigma_f = 0.7 over the first 200K steps; both stay flat afterwards.
Being functions of the step alone, a resumed run needs nothing but the step to continue both schedules.
`step` is the index of the gradient step being taken (0 for the first one). The n of either schedule may also be
given as a share of the run (anneal_steps), resolved to a count once the run's length is fixed.
"""


def anneal_steps(n, total):
    """--lr_n / --sigma_n -> steps: 0 the whole run (`total` steps), a value between 0 and 1 that share of it, else
    the count itself."""
    if n == 0:
        return total
    return max(1, round(n * total)) if n < 1 else n


def _linear(step, start, end, n):
    if n <= 0:
        return end
    t = min(max(step / n, 0.0), 1.0)
    return end + (start - end) * (1.0 - t)


def learning_rate(step, lr_i=5e-4, lr_f=5e-5, n=1.6e6):
    """Adam's learning rate mu at `step`: lr_i at 0, linear to lr_f at n, then lr_f."""
    return _linear(step, lr_i, lr_f, n)


def pixel_sigma(step, sigma_i=2.0, sigma_f=0.7, n=2e5):
    """Pixel standard deviation sigma at `step`: sigma_i at 0, linear to sigma_f at n, then sigma_f."""
    return _linear(step, sigma_i, sigma_f, n)


def kl_weight(step, warmup=0):
    """KL warm-up (Sønderby et al. 2016; not in the paper): the KL's weight beta rises linearly from 0 at step 0 to 1
    at `warmup`, then stays 1; warmup 0 is the paper's objective, beta = 1 throughout."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)
