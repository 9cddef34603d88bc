"""model.py's fast computation equals the straightforward one in reference.py on the same weights (Eslami et al. 2018, fig. S2);
activation checkpointing and bf16 autocast keep the function."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_GQN, random_batch
from model import GQN
from reference import reference_elbo, reference_run

pytestmark = pytest.mark.usefixtures("one_thread")

def inputs(model, B=2, M=3, dtype=torch.float64, device="cpu", seed=0):
    """A random batch (conftest.random_batch), with the posterior's noise and a ragged mask of context views."""
    x, v, v_q, x_q = random_batch(B, M, seed=seed, dtype=dtype)
    eps = torch.randn(B, *model.noise_shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)[:B]
    return [t.to(device) for t in (x, v, v_q, x_q)], dict(mask=mask.to(device), eps=eps.to(device))


def elbo_and_grads(fn, model, args, kwargs):
    out = fn(*args, 0.8, **kwargs)
    grads = torch.autograd.grad(out.elbo.sum(), list(model.parameters()))
    return out, grads


def assert_equals_reference(model, args, kwargs):
    """model's ELBO and every gradient equal reference.py's on the same weights (float64) -> model's ELBO."""
    fast, g_fast = elbo_and_grads(model, model, args, kwargs)
    ref, g_ref = elbo_and_grads(lambda *a, **k: reference_elbo(model, *a, **k), model, args, kwargs)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
    for (name, _), a, b in zip(model.named_parameters(), g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    return fast


@pytest.mark.parametrize("representation", ["pyramid", "tower", "pool"])
@pytest.mark.parametrize("shared_core", [False, True])
def test_fast_path_equals_reference(representation, shared_core):
    torch.manual_seed(0)
    model = GQN(representation, L=3, shared_core=shared_core, **TINY_GQN).double()
    args, kwargs = inputs(model)
    assert_equals_reference(model, args, kwargs)


@pytest.mark.parametrize("z_grid", [1, 2])
def test_a_coarser_z_grid_equals_reference(z_grid):
    """--z_grid: the heads averaged over blocks, z repeated over them, as reference.py spells it out."""
    torch.manual_seed(0)
    model = GQN("tower", L=3, z_grid=z_grid, **TINY_GQN).double()
    assert model.noise_shape == (3, TINY_GQN["z_dim"], z_grid, z_grid)
    args, kwargs = inputs(model)
    assert_equals_reference(model, args, kwargs)
    x, v, v_q, _ = args
    noise = torch.randn(2, *model.noise_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        _, expected = reference_run(model, x, v, v_q, None, noise, kwargs["mask"])
        got = model.generate(x, v, v_q, mask=kwargs["mask"], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("representation", ["tower", "pool"])
def test_image_from_r_equals_reference_and_starts_as_the_papers_model(representation):
    torch.manual_seed(0)
    paper = GQN(representation, L=3, **TINY_GQN).double()
    torch.manual_seed(0)
    model = GQN(representation, L=3, image_from_r=True, **TINY_GQN).double()
    args, kwargs = inputs(model)
    # η_r is zero at the start: the same ELBO as the paper's model with the same other weights, and a gradient
    with torch.no_grad():
        torch.testing.assert_close(model(*args, 0.8, **kwargs).elbo, paper(*args, 0.8, **kwargs).elbo)
    _, grads = elbo_and_grads(model, model, args, kwargs)
    assert dict(zip([n for n, _ in model.named_parameters()], grads))["image_from_r.weight"].abs().sum() > 0
    with torch.no_grad():  # weights of its own, so that the path counts in the comparison
        model.image_from_r.weight.normal_(0, 0.3)
        model.image_from_r.bias.normal_(0, 0.3)
    fast = assert_equals_reference(model, args, kwargs)
    assert not torch.allclose(fast.elbo, paper(*args, 0.8, **kwargs).elbo)


@pytest.mark.parametrize("representation", ["pyramid", "tower", "pool"])
@pytest.mark.parametrize("shared_core", [False, True])
def test_generate_and_reconstruct_equal_reference(representation, shared_core):
    torch.manual_seed(0)
    model = GQN(representation, L=3, shared_core=shared_core, **TINY_GQN).double()
    (x, v, v_q, x_q), kwargs = inputs(model)
    mask = kwargs["mask"]
    noise = torch.randn(2, *model.noise_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        _, expected = reference_run(model, x, v, v_q, None, noise, mask)
        got = model.generate(x, v, v_q, mask=mask, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        _, expected = reference_run(model, x, v, v_q, x_q, noise, mask)
        got = model.reconstruct(x, v, v_q, x_q, mask=mask, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared_core", [False, True])
def test_channels_last_keeps_the_function(shared_core, dtype):
    """train.py --channels_last / bench.py --channels_last: NHWC weights give the reference's ELBO and gradients."""
    torch.manual_seed(0)
    model = GQN("tower", L=3, shared_core=shared_core, **TINY_GQN).to(dtype)
    args, kwargs = inputs(model, dtype=dtype)
    ref, g_ref = elbo_and_grads(lambda *a, **k: reference_elbo(model, *a, **k), model, args, kwargs)
    model.to(memory_format=torch.channels_last)
    assert model.generation_core.upsample.weight.is_contiguous(memory_format=torch.channels_last)
    fast, g_fast = elbo_and_grads(model, model, args, kwargs)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, **tol)
    for (name, _), a, b in zip(model.named_parameters(), g_fast, g_ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shared_core", [False, True])
def test_checkpoint_activations_gives_the_same_gradients(shared_core):
    torch.manual_seed(0)
    model = GQN("tower", L=3, shared_core=shared_core, **TINY_GQN).double()
    args, kwargs = inputs(model)
    plain, g_plain = elbo_and_grads(model, model, args, kwargs)
    model.checkpoint_activations = True
    ckpt, g_ckpt = elbo_and_grads(model, model, args, kwargs)
    torch.testing.assert_close(plain.elbo, ckpt.elbo)
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_runs_with_float32_kl_and_nll():
    torch.manual_seed(0)
    model = GQN("pool", L=2, **TINY_GQN)
    args, kwargs = inputs(model, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*args, 0.8, **kwargs)
    assert all(t.dtype == torch.float32 for t in out)
    full = model(*args, 0.8, **kwargs)
    torch.testing.assert_close(out.elbo, full.elbo, rtol=0.02, atol=2.0)  # bf16 convs: close, not equal
    params = list(model.parameters())
    g_bf16 = torch.autograd.grad(-out.elbo.mean(), params, allow_unused=True)
    g_full = torch.autograd.grad(-full.elbo.mean(), params, allow_unused=True)
    # training follows the same direction: every weight's bf16 gradient points where the float32 one does
    for p, a, b in zip(params, g_bf16, g_full):
        if b is None or b.norm() == 0:
            continue
        assert torch.isfinite(a).all() and a.dtype == torch.float32
        assert F.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.98, tuple(p.shape)


@pytest.mark.parametrize("representation", ["pyramid", "tower", "pool", "volume"])
def test_compile_traces_the_training_step_in_one_graph(representation):
    """torch.compile(fullgraph=True): every representation's forward and backward, padded context views included,
    trace without a graph break (any break is an error under fullgraph), and compute the eager function. Traced with
    the aot_eager backend: the same graphs inductor compiles, without minutes of C++ compilation on a CPU."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GQN(representation, L=2, **TINY_GQN).train()
    args, kwargs = inputs(model, dtype=torch.float32)
    if representation == "volume":
        kwargs["depth_noise"] = torch.rand(2, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, grads = elbo_and_grads(compiled, model, args, kwargs)
    ref, ref_grads = elbo_and_grads(model, model, args, kwargs)
    torch.testing.assert_close(out.elbo, ref.elbo)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shared_core", [False, True])
def test_cuda_equals_cpu(shared_core):
    torch.manual_seed(0)
    model = GQN("tower", L=3, shared_core=shared_core, **TINY_GQN).double()
    args, kwargs = inputs(model)
    cpu = model(*args, 0.8, **kwargs)
    model_cuda = model.cuda()
    args, kwargs = inputs(model_cuda, device="cuda")
    cuda = model_cuda(*args, 0.8, **kwargs)
    torch.testing.assert_close(cuda.elbo.cpu(), cpu.elbo)
    ref = reference_elbo(model_cuda, *args, 0.8, **kwargs)
    torch.testing.assert_close(cuda.elbo, ref.elbo)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_and_compile_run():
    torch.manual_seed(0)
    model = GQN("pool", L=2, **TINY_GQN).cuda().to(memory_format=torch.channels_last)
    args, kwargs = inputs(model, dtype=torch.float32, device="cuda")
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(*args, 0.8, **kwargs)
    assert out.kl.dtype == torch.float32
    full = model(*args, 0.8, **kwargs)
    torch.testing.assert_close(out.elbo, full.elbo, rtol=0.02, atol=2.0)
