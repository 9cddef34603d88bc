"""The GQN modules (Eslami et al. 2018, figs. S1, S2): shapes, the mask, the analytic KL, determinism, a tiny overfit."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_GQN, random_batch
from conv_lstm import ConvLSTMCell
from core import GenerationCore, InferenceCore, broadcast_conv
from model import GQN, gaussian_kl, gaussian_nll
from representation import Pool, Pyramid, SceneEncoder, Tower

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.mark.parametrize("net,shape", [(Pyramid, (256, 1, 1)), (Tower, (256, 16, 16)), (Pool, (256, 1, 1))])
def test_representation_networks_have_the_papers_sizes(net, shape):
    torch.manual_seed(0)
    r = net()(torch.rand(2, 3, 64, 64), torch.randn(2, 7))
    assert r.shape == (2, *shape)
    assert (r >= 0).all()  # every network ends in a ReLU


@pytest.mark.parametrize("representation,size", [("pyramid", 1), ("tower", 8), ("pool", 1)])
def test_scene_encoder_sums_each_scenes_own_views(representation, size):
    torch.manual_seed(0)
    enc = SceneEncoder(representation, r_dim=16, image_size=32)
    x, v, _, _ = random_batch(B=3, M=4, size=32)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)  # ragged M: 4, 1, 2
    r = enc(x, v, mask)
    assert r.shape == (3, 16, size, size)
    for b in range(3):
        real = mask[b].nonzero().squeeze(1)
        expected = enc.net(x[b, real], v[b, real]).sum(0)
        torch.testing.assert_close(r[b], expected, rtol=1e-5, atol=1e-5)
    # no mask = every view real
    torch.testing.assert_close(enc(x, v), enc(x, v, torch.ones(3, 4, dtype=torch.bool)), rtol=1e-5, atol=1e-5)


def test_padded_views_do_not_change_r():
    torch.manual_seed(0)
    enc = SceneEncoder("tower", r_dim=16, image_size=16)
    x, v, _, _ = random_batch(B=2, M=2)
    padded_x = torch.cat([x, torch.rand(2, 3, 3, 16, 16)], 1)  # three more views of garbage, marked not real
    padded_v = torch.cat([v, torch.randn(2, 3, 7)], 1)
    mask = torch.tensor([[1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    torch.testing.assert_close(enc(padded_x, padded_v, mask), enc(x, v), rtol=1e-5, atol=1e-5)


def test_conv_lstm_cell_is_the_papers_cell():
    torch.manual_seed(0)
    cell = ConvLSTMCell(3, 4)
    assert cell.gates.kernel_size == (5, 5)
    x, c, h = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    c1, h1 = cell(x, (c, h))
    assert c1.shape == h1.shape == (2, 4, 6, 6)
    w, b = cell.gates.weight, cell.gates.bias
    f, i, o, s = (F.conv2d(torch.cat([x, h], 1), w[k * 4:(k + 1) * 4], b[k * 4:(k + 1) * 4], padding=2)
                  for k in range(4))
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(s)
    torch.testing.assert_close(c1, c_ref)
    torch.testing.assert_close(h1, torch.sigmoid(o) * torch.tanh(c_ref))
    # state None is the zero state; input None an all-zero input
    zeros = torch.zeros(2, 4, 6, 6)
    for got, want in zip(cell(x), cell(x, (zeros, zeros))):
        torch.testing.assert_close(got, want)
    extra = torch.randn(2, 16, 6, 6)
    for got, want in zip(cell(None, gates_in=extra), cell(torch.zeros(2, 3, 6, 6), (zeros, zeros), extra)):
        torch.testing.assert_close(got, want)


def test_broadcast_conv_equals_convolving_the_broadcast_map():
    torch.manual_seed(0)
    c, w = torch.randn(3, 5), torch.randn(8, 5, 5, 5)
    expected = F.conv2d(c[:, :, None, None].expand(-1, -1, 7, 7), w, padding=2)
    torch.testing.assert_close(broadcast_conv(c, w, 7), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r_spatial", [False, True])
def test_core_shapes(r_spatial):
    L, B = 3, 2
    r = torch.randn(B, 16, *((4, 4) if r_spatial else (1, 1)))
    ic = InferenceCore(L, r_dim=16, r_spatial=r_spatial, h_dim=8, u_dim=6)
    gates = ic.invariant_gates(torch.rand(B, 3, 16, 16), torch.randn(B, 7), r)
    assert len(gates) == L and all(g.shape == (B, 32, 4, 4) for g in gates)
    assert ic.downsample_u.weight.shape == (L * 6, 6, 4, 4) and ic.downsample_u.stride == (4, 4)
    gc = GenerationCore(L, r_dim=16, r_spatial=r_spatial, z_dim=3, h_dim=8, u_dim=6)
    gates = gc.invariant_gates(torch.randn(B, 7), r, 4)
    assert len(gates) == L and all(g.shape == (B, 32, 4, 4) for g in gates)
    c, h = gc.cells[0](torch.randn(B, 3, 4, 4), None, gates[0])
    assert c.shape == h.shape == (B, 8, 4, 4)
    assert gc.upsample(torch.randn(B, L * 8, 4, 4)).shape == (B, 6, 16, 16)  # the canvas is 4x the core's map


def test_paper_sizes_and_no_learned_upsampling_of_r_and_v():
    model = GQN("tower", L=12, shared_core=False)
    assert model.noise_shape == (12, 3, 16, 16)
    assert len(model.generation_core.cells) == len(model.inference_core.cells) == 12
    assert len(GQN("pool", L=12, shared_core=True).generation_core.cells) == 1
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) and m.kernel_size == (16, 16) for m in model.modules())
    # per layer: C_e gates over [x_q↓ 3, v 7, r 256, h_g 128, u↓ 128] + h_e 128; C_g over [v 7, r 256, z 3] + h_g 128
    n = sum(p.numel() for p in model.parameters())
    per_layer = 4 * 128 * 25 * ((3 + 7 + 256 + 128 + 128 + 128) + (7 + 256 + 3 + 128))
    assert 12 * per_layer < n < 12 * per_layer + 10e6  # no hidden ~400M parameters


@pytest.mark.parametrize("representation", ["pyramid", "tower", "pool"])
@pytest.mark.parametrize("shared_core", [False, True])
def test_forward_generate_reconstruct_shapes_and_range(representation, shared_core):
    torch.manual_seed(0)
    model = GQN(representation, L=2, shared_core=shared_core, **TINY_GQN)
    x, v, v_q, x_q = random_batch()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = model(x, v, v_q, x_q, 2.0, mask=mask)
    for t in out:
        assert t.shape[0] == 2 and t.dtype == torch.float32 and torch.isfinite(t).all()
    assert out.elbo.shape == out.kl.shape == out.nll.shape == (2,) and out.kl_steps.shape == (2, 2)
    torch.testing.assert_close(out.elbo, -(out.kl + out.nll))
    torch.testing.assert_close(out.kl, out.kl_steps.sum(1))
    assert (out.kl_steps >= 0).all()
    for img in (model.generate(x, v, v_q, mask=mask), model.reconstruct(x, v, v_q, x_q, mask=mask)):
        assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1


def test_eps_makes_forward_deterministic_and_generator_makes_generate_deterministic():
    torch.manual_seed(0)
    model = GQN("pool", L=3, **TINY_GQN)
    x, v, v_q, x_q = random_batch()
    eps = torch.randn(2, *model.noise_shape)
    a, b = model(x, v, v_q, x_q, 1.0, eps=eps), model(x, v, v_q, x_q, 1.0, eps=eps)
    assert torch.equal(a.elbo, b.elbo)
    assert not torch.equal(model(x, v, v_q, x_q, 1.0).kl, model(x, v, v_q, x_q, 1.0).kl)  # eps None: fresh noise
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(x, v, v_q, generator=g1), model.generate(x, v, v_q, generator=g2))


def test_config_rebuilds_the_model():
    model = GQN("tower", L=2, shared_core=True, image_from_r=True, **TINY_GQN)
    clone = GQN(**model.config)
    clone.load_state_dict(model.state_dict())
    assert clone.config == model.config and clone.image_from_r is not None
    assert set(model.config) == {"representation", "L", "shared_core", "x_channels", "v_dim", "r_dim", "h_dim",
                                 "z_dim", "u_dim", "image_size", "checkpoint_activations", "kernel_size",
                                 "image_from_r"}
    coarse = GQN("pool", L=2, z_grid=2, **TINY_GQN)
    assert GQN(**coarse.config).noise_shape == coarse.noise_shape == (2, TINY_GQN["z_dim"], 2, 2)


def test_bad_construction_is_one_clear_error():
    with pytest.raises(ValueError, match="representation"):
        GQN("towers")
    with pytest.raises(ValueError, match="image size|image_size"):
        GQN("pyramid", image_size=36)
    with pytest.raises(ValueError, match="L"):
        GQN(L=0)
    with pytest.raises(ValueError, match="z_grid must divide the cores' grid of image_size/4 = 8, got 3"):
        GQN("pool", image_size=32, z_grid=3)


def test_wrong_shapes_are_one_clear_error():
    model = GQN("pool", L=2, **TINY_GQN)
    x, v, v_q, x_q = random_batch()
    with pytest.raises(ValueError, match="image_size=16"):
        model(torch.rand(2, 3, 3, 32, 32), v, v_q, x_q, 1.0)
    with pytest.raises(ValueError, match="eps"):
        model(x, v, v_q, x_q, 1.0, eps=torch.randn(2, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        model.generate(x, v, v_q, mask=torch.ones(2, 4, dtype=torch.bool))


def test_kl_matches_a_monte_carlo_estimate():
    torch.manual_seed(0)
    shape = (2, 3, 4, 4)
    mu_q, mu_p = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    ls_q, ls_p = 0.3 * torch.randn(shape, dtype=torch.float64), 0.3 * torch.randn(shape, dtype=torch.float64)
    kl = gaussian_kl(mu_q, ls_q, mu_p, ls_p)
    n = 20000
    z = mu_q + ls_q.exp() * torch.randn(n, *shape, dtype=torch.float64)
    log_q = -0.5 * ((z - mu_q) / ls_q.exp()) ** 2 - ls_q
    log_p = -0.5 * ((z - mu_p) / ls_p.exp()) ** 2 - ls_p
    mc = (log_q - log_p).sum((2, 3, 4))  # (n, B)
    stderr = mc.std(0) / math.sqrt(n)
    assert ((mc.mean(0) - kl).abs() < 4 * stderr).all(), (mc.mean(0), kl, stderr)
    assert torch.allclose(gaussian_kl(mu_q, ls_q, mu_q, ls_q), torch.zeros(2, dtype=torch.float64))


def test_nll_is_the_gaussian_in_nats_per_image():
    x, mean = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    expected = -torch.distributions.Normal(mean, 0.7).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(gaussian_nll(x, mean, 0.7), expected)
    # the sigma floor ports plateau at: 6909 nats for a perfect 64x64x3 prediction at sigma = 0.7
    assert gaussian_nll(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64), 0.7).item() == pytest.approx(6909, abs=1)


def test_tiny_overfit_lowers_the_loss():
    torch.manual_seed(0)
    model = GQN("pool", L=2, shared_core=True, **TINY_GQN)
    x, v, v_q, x_q = random_batch(B=4, M=2)
    eps = torch.randn(4, *model.noise_shape)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = -model(x, v, v_q, x_q, 0.3, eps=eps).elbo.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # from ~140 nats to well below: the model learns the query images (a mean-image guess alone gives ~100)
    assert losses[-1] < losses[0] - 40, losses


def test_objective_is_the_elbo_unless_kl_warmup_or_free_bits_are_asked_for():
    from model import ELBO, objective
    from scheduler import kl_weight

    kl_steps = torch.tensor([[0.5, 3.0], [2.0, 0.1]])
    out = ELBO(-(kl_steps.sum(1) + 10), kl_steps.sum(1), torch.tensor([10.0, 10.0]), kl_steps)
    torch.testing.assert_close(objective(out), -out.elbo)  # the paper's loss
    torch.testing.assert_close(objective(out, beta=0.5), torch.tensor([10 + 1.75, 10 + 1.05]))
    # free bits: each step's KL below 1 nat counts as 1 nat (no gradient pushes it further down), per scene
    torch.testing.assert_close(objective(out, free_bits=1.0), torch.tensor([10 + 1 + 3.0, 10 + 2.0 + 1]))
    assert [kl_weight(s, 100) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0] and kl_weight(0, 0) == 1.0
    kl = kl_steps.clone().requires_grad_()
    objective(ELBO(None, kl.sum(1), torch.zeros(2), kl), free_bits=1.0).sum().backward()
    assert kl.grad.tolist() == [[0.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("balance", [0.8, 0.2])
def test_kl_balance_shares_the_kls_gradient_between_prior_and_posterior(balance):
    """With one generation step the prior is η_π's bias alone and z feeds only the image: the KL's gradient reaches
    the prior scaled by 2 * balance and everything behind the posterior by 2 * (1 - balance); the KL is the same."""
    torch.manual_seed(0)
    model = GQN("pool", L=1, **TINY_GQN)
    x, v, v_q, x_q = random_batch()
    eps = torch.randn(2, *model.noise_shape)

    def kl_and_grads(kl_balance):
        model.zero_grad(set_to_none=True)
        kl = model(x, v, v_q, x_q, 1.0, eps=eps, kl_balance=kl_balance).kl
        kl.sum().backward()
        return kl.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    kl, elbo_grads = kl_and_grads(0.5)
    balanced, grads = kl_and_grads(balance)
    assert torch.equal(kl, balanced)
    assert set(grads) == set(elbo_grads) and "prior.bias" in grads and "posterior.weight" in grads
    for name, grad in grads.items():
        share = 2 * balance if name == "prior.bias" else 2 * (1 - balance)
        torch.testing.assert_close(grad, share * elbo_grads[name], rtol=1e-5, atol=1e-7)

