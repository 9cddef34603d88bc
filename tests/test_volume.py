"""volume.py: its cameras agree with the renderer's pixels, and r behaves as a scene representation should."""
import math

import numpy as np
import pytest
import torch

from checkpoint import build_model, load_checkpoint, save_checkpoint
from conftest import TINY_GQN
from dataset import shepard_metzler as sm
from cameras import camera_frames, pose7
from model import GQN
from volume import SAMPLES, Volume, project

pytestmark = pytest.mark.usefixtures("one_thread")


def random_cameras(n, seed):
    return pose7(torch.from_numpy(sm.random_cameras(np.random.default_rng(seed), n)))


def test_camera_frames_are_orthonormal_and_look_at_the_centre():
    v = random_cameras(50, 0)
    o, d, right, up = camera_frames(v)
    for a in (d, right, up):
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(50))
    for a, b in ((d, right), (d, up), (right, up)):
        torch.testing.assert_close((a * b).sum(-1), torch.zeros(50), atol=1e-6, rtol=0)
    torch.testing.assert_close(o + sm.DISTANCE * d, torch.zeros(50, 3), atol=1e-5, rtol=0)
    assert (up[:, 2] > 0).all()  # world z is image up


def test_projection_lands_on_the_rendered_cube():
    """A cube placed off-centre: its projected centre is its silhouette's centre in the renderer's images."""
    rng = np.random.default_rng(1)
    cams5 = sm.random_cameras(rng, 15)
    v = pose7(torch.from_numpy(cams5))
    for offset in ([2, -1, 1], [-2, 0, -2], [0, 2, 2]):
        centre = np.array([offset], np.float64) * sm.CUBE
        images = sm.render_views(centre, np.ones((1, 3)), cams5).max(-1)  # (15, 64, 64)
        xy, seen = project(torch.tensor(centre, dtype=torch.float32)[None], v[None], math.tan(sm.FOV / 2))
        assert seen.all()
        for k, image in enumerate(images):
            rows, cols = np.nonzero(image > 0)  # every face, lit or not
            col = (xy[0, k, 0, 0].item() + 1) / 2 * 64  # grid_sample's [-1, 1] across the image's outer edges
            row = (xy[0, k, 0, 1].item() + 1) / 2 * 64
            assert abs(cols.mean() + 0.5 - col) < 1 and abs(rows.mean() + 0.5 - row) < 1


def test_points_behind_the_camera_or_outside_the_image_are_not_seen():
    v = random_cameras(1, 2)[None]  # (1, 1, 7)
    o, d, _, _ = camera_frames(v[0, 0])
    points = torch.stack([o - d, o + 10 * d, o + 3 * d + 5 * torch.tensor([0, 0, 1.0])])[None]
    _, seen = project(points, v, math.tan(sm.FOV / 2))
    assert seen[0, 0].tolist() == [False, True, False]


def scenes(B=3, K=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, K, 3, size, size, generator=g)
    v = random_cameras(B * K + B, seed).view(B, K + 1, 7)
    return x, v[:, :K].contiguous(), v[:, K].contiguous()


def test_r_shape_and_padded_views_do_not_count():
    torch.manual_seed(0)
    net = Volume(r_dim=16, image_size=16).eval()  # eval: the depths are fixed, not jittered
    x, v, v_q = scenes()
    r = net(x, v, None, v_q)
    assert r.shape == (3, 16, 4, 4)
    # the same scenes with two padded views of noise appended and masked out
    pad_x = torch.cat([x, torch.rand(3, 2, 3, 16, 16)], 1)
    pad_v = torch.cat([v, random_cameras(6, 9).view(3, 2, 7)], 1)
    mask = torch.arange(6)[None].expand(3, 6) < 4
    torch.testing.assert_close(net(pad_x, pad_v, mask, v_q), r, atol=1e-5, rtol=1e-5)


def test_r_ignores_view_order_and_depends_on_the_query_camera():
    torch.manual_seed(0)
    net = Volume(r_dim=16, image_size=16).eval()
    x, v, v_q = scenes()
    r = net(x, v, None, v_q)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(net(x[:, perm], v[:, perm], None, v_q), r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(net(x, v, None, v_q.roll(1, 0)), r, atol=1e-3)


def reference_read(net, feats, v, mask, v_q, noise):
    """Volume.read as its docstring writes it, every view weighted by whether it sees the point, autograd throughout."""
    B, K = feats.shape[:2]
    n, D = net.rays, noise.shape[1]
    o, d, right, up = camera_frames(v_q)
    g = (torch.arange(n, dtype=v_q.dtype) + 0.5) * (2 / n) - 1
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    rays = d[:, None, None] + net.tan_half_fov * (gx[..., None] * right[:, None, None] - gy[..., None] * up[:, None, None])
    t = net.depths(B, v_q.dtype, v_q.device, noise)
    points = (o[:, None, None, None] + t[:, None, None, :, None] * rays[:, :, :, None]).reshape(B, -1, 3)
    o, d, right, up = (a[:, :, None] for a in camera_frames(v))
    q = points[:, None] - o
    depth = (q * d).sum(-1)
    scale = depth.clamp(min=1e-6) * net.tan_half_fov
    xy = torch.stack([(q * right).sum(-1) / scale, -(q * up).sum(-1) / scale], -1)
    seen = (depth > 0) & (xy.abs() < 1).all(-1) & mask[:, :, None]
    sampled = torch.nn.functional.grid_sample(feats.flatten(0, 1), xy.flatten(0, 1)[:, None], align_corners=False)
    sampled = sampled.squeeze(2).unflatten(0, (B, K))
    w = seen[:, :, None].to(sampled.dtype)
    views = w.sum(1)
    mean = (sampled * w).sum(1) / views.clamp(min=1)
    var = ((sampled - mean[:, None]) ** 2 * w).sum(1) / views.clamp(min=1)
    real = mask.sum(1).to(v_q.dtype).view(B, 1, 1).clamp(min=1)
    out = net.point(torch.cat([mean, var, views / real], 1).transpose(1, 2)).view(B, n, n, D, -1)
    alpha = 1 - torch.exp(-torch.nn.functional.softplus(out[..., 0]))
    clear = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1]], -1), -1)
    weight = alpha * clear
    f = (weight[..., None] * out[..., 1:]).sum(3)
    depth = (weight * (t[:, None, None] - net.near)).sum(3, keepdim=True) / (net.far - net.near)
    r = torch.cat([f, weight.sum(3, keepdim=True), depth], -1).permute(0, 3, 1, 2)
    return net.out(torch.nn.functional.pixel_unshuffle(r, 2))


@pytest.mark.parametrize("samples", [SAMPLES, 5])
def test_read_matches_the_plain_formulas_and_their_gradients(samples):
    """read()'s sampling of unseen points outside the image and its hand-written mean/variance backward (ViewStats)
    give the plain formulas' r and gradients, in float64, with padded views and points no view sees."""
    torch.manual_seed(0)
    net = Volume(r_dim=16, image_size=16, samples=samples).double()
    x, v, v_q = scenes(B=3, K=4)
    x, v, v_q = x.double().requires_grad_(), v.double(), v_q.double()
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    noise = torch.rand(3, samples, dtype=torch.float64)
    grads = []
    for read in (net.read, lambda *a: reference_read(net, *a)):
        r = read(net.features(x, mask), v, mask, v_q, noise)
        (r * torch.linspace(-1, 1, r.numel(), dtype=r.dtype).view_as(r)).sum().backward()
        grads.append([r.detach()] + [p.grad.clone() for p in (x, *net.parameters())])
        x.grad = None
        net.zero_grad()
    for new, ref in zip(*grads):
        torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-12)


def test_bad_camera_settings_are_refused():
    with pytest.raises(ValueError, match="fov"):
        Volume(fov=0)
    with pytest.raises(ValueError, match="near < far"):
        Volume(near=4.0, far=3.0)
    for samples in (0, 2.5):
        with pytest.raises(ValueError, match="depth samples"):
            Volume(samples=samples)


def test_depth_samples_divide_the_range_evenly_and_jitter_within_their_slots():
    """--depth_samples D: D depths, one in each of D equal slots of [near, far]; at their centres when evaluating,
    anywhere in their slot (by the noise) when training; the training noise has one number per depth."""
    net = Volume(near=1.0, far=4.0, samples=6)
    slot = torch.arange(6, dtype=torch.float64) * 0.5 + 1.0  # each slot's near end
    torch.testing.assert_close(net.eval().depths(2, torch.float64, "cpu"), (slot + 0.25).expand(2, 6))
    noise = torch.tensor([[0.0] * 6, [0.999] * 6], dtype=torch.float64)
    t = net.train().depths(2, torch.float64, "cpu", noise)
    torch.testing.assert_close(t, torch.stack([slot, slot + 0.4995]))
    model = GQN("volume", L=1, **TINY_GQN, depth_samples=6)
    assert model.training_noise()["depth_noise"] == ("uniform", (6,))
    assert GQN("volume", L=1, **TINY_GQN).training_noise()["depth_noise"] == ("uniform", (SAMPLES,))


def test_one_ray_a_cell_reads_a_quarter_of_the_points_into_the_same_r(tmp_path):
    """--cell_rays 1: one query ray through each of r's cells instead of 2x2, the same r's shape; the checkpoint
    records it and draws the same images once loaded; a checkpoint that records none is read with 2x2, as before
    the flag."""
    torch.manual_seed(0)
    x, v, v_q = scenes(B=2)
    one, two = Volume(r_dim=8, image_size=16, cell_rays=1), Volume(r_dim=8, image_size=16)
    assert (one.rays, two.rays) == (4, 8)  # rays a side of the query image: r's 4x4 cells, one ray or 2x2 each
    assert one(x, v, None, v_q).shape == two(x, v, None, v_q).shape == (2, 8, 4, 4)
    with pytest.raises(ValueError, match="whole number of rays a side, at least one, got 0"):
        Volume(cell_rays=0)
    model = GQN("volume", L=1, **TINY_GQN, cell_rays=1)
    assert model.config["cell_rays"] == 1 and "cell_rays" not in GQN("volume", L=1, **TINY_GQN).config
    path = tmp_path / "c.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "step": 1}, [path])
    again = build_model(load_checkpoint(path))
    assert again.representation.rays == 4
    first = model.eval().generate(x, v, v_q, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.eval().generate(x, v, v_q, generator=torch.Generator().manual_seed(0)), first)


def test_gqn_with_volume_trains_and_its_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = GQN("volume", L=2, **TINY_GQN, fov=30.0, near=2.5, far=4.5, depth_samples=12)
    x, v, v_q = scenes(B=4)
    x_q = torch.rand(4, 3, 16, 16)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(30):  # one batch, over and over: the loss must fall, through the representation too
        loss = -model(x, v, v_q, x_q, 0.1).elbo.mean()
        opt.zero_grad()
        loss.backward()
        assert model.representation.point[0].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 500
    path = tmp_path / "c.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "step": 30}, [path])
    again = build_model(load_checkpoint(path))
    assert again.config["fov"] == 30.0 and again.config["near"] == 2.5 and again.config["far"] == 4.5
    assert again.representation.samples == 12
    g = torch.Generator().manual_seed(0)
    first = model.eval().generate(x, v, v_q, generator=g)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(again.eval().generate(x, v, v_q, generator=g), first)
