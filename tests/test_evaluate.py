"""evaluate.py: the metrics, the JSON a user scripts against, determinism, and one clear error for bad input."""
import json
import math

import pytest
import torch
from PIL import Image

import checkpoint
import evaluate
import metrics
from conftest import SIZE, main_error, make_checkpoint, make_data
from gqn_dataset import GQNDataset

@pytest.fixture
def setup(tmp_path):
    test = make_data(tmp_path / "test", scenes=5)
    train = make_data(tmp_path / "train", scenes=4, seed=1)
    ckpt = make_checkpoint(tmp_path / "latest.pt")
    return tmp_path, str(ckpt), str(test), str(train)


def run_main(argv):
    return evaluate.main([*argv, "--device", "cpu"])


def test_image_errors_perfect_predictor_scores_zero():
    x = torch.rand(4, 3, 8, 8) * 255
    mae, rmse = metrics.image_errors(x, x.clone())
    assert mae.tolist() == [0.0] * 4 and rmse.tolist() == [0.0] * 4


def test_rmse_is_per_image_then_averaged():
    target = torch.zeros(2, 3, 4, 4)
    pred = target.clone()
    pred[1] += 4.0  # image 0 perfect, image 1 off by 4 everywhere
    mae, rmse = metrics.image_errors(pred, target)
    assert rmse.tolist() == [0.0, 4.0] and mae.tolist() == [0.0, 4.0]
    assert rmse.mean().item() == 2.0  # not sqrt(mean of all squared errors) = 2.83


def test_psnr_and_ssim_are_torchmetrics_own_per_image():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    torch.manual_seed(0)
    target = torch.rand(3, 3, SIZE, SIZE)
    noisy = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    got = metrics.image_scores(noisy * 255, target * 255)
    for i in range(3):  # each image on its own, images in [0, 1]
        mse = (noisy[i].double() - target[i].double()).pow(2).mean().item()
        assert got["psnr"][i].item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
        assert got["psnr"][i].item() == pytest.approx(
            peak_signal_noise_ratio(noisy[i:i + 1], target[i:i + 1], data_range=1.0).item(), rel=1e-5)
        assert got["ssim"][i].item() == pytest.approx(
            structural_similarity_index_measure(noisy[i:i + 1], target[i:i + 1], data_range=1.0).item(), abs=1e-5)
    assert 0 < got["ssim"].min() < got["ssim"].max() < 1
    # A perfect image: PSNR inf (no epsilon), SSIM 1, MAE and RMSE 0.
    same = metrics.image_scores(target * 255, target * 255)
    assert same["psnr"].tolist() == [math.inf] * 3 and same["ssim"].tolist() == pytest.approx([1.0] * 3)
    assert same["rmse"].tolist() == [0.0] * 3


def test_best_of_picks_each_images_lowest_rmse_draw():
    torch.manual_seed(0)
    target = torch.rand(4, 3, SIZE, SIZE) * 255
    draws = target + torch.randn(5, 4, 1, 1, 1) * 40 * torch.rand(5, 4, 3, SIZE, SIZE)  # (N, B, 3, H, W)
    best = metrics.best_of(draws, target)
    each = torch.stack([metrics.image_errors(d, target)[1] for d in draws])  # (N, B)
    assert (best["rmse"][None] <= each).all()
    assert torch.equal(best["rmse"], each.min(0).values)
    chosen = each.argmin(0)
    assert len(set(chosen.tolist())) > 1  # the best draw differs between images
    for b, n in enumerate(chosen.tolist()):
        alone = metrics.image_scores(draws[n, b:b + 1], target[b:b + 1])
        assert all(best[k][b] == alone[k][0] for k in ("mae", "psnr", "ssim"))


def test_bits_per_dim_of_a_uniform_density_is_eight():
    # A density of 1 on [0, 1]^D (0 nats) is the uniform distribution over the 256 grey levels.
    assert metrics.bits_per_dim(0.0, 3 * 64 * 64) == pytest.approx(8.0)
    assert metrics.bits_per_dim(3 * 64 * 64 * math.log(2), 3 * 64 * 64) == pytest.approx(9.0)


def test_mean_image_is_the_mean_of_every_view(tmp_path):
    ds = GQNDataset(str(make_data(tmp_path / "d", scenes=3)))
    expected = torch.stack([ds[i][0].double() for i in range(len(ds))]).mean((0, 1))
    got = evaluate.mean_image(ds, SIZE, max_scenes=0, progress=False)
    assert torch.allclose(got.double(), expected, atol=1e-4)


def test_json_fields_are_present_and_sane(setup):
    tmp, ckpt, test, train = setup
    out = tmp / "r.json"
    run_main(["--checkpoint", ckpt, "--test_data_dir", test, "--train_data_dir", train, "--json", str(out),
              "--context", "3", "--batch_size", "2"])
    r = json.loads(out.read_text())
    assert r["scenes"] == 5 and r["context"] == 3 and r["sigma"] == 0.7 and r["step"] == 7
    assert r["dataset"] == "shepard_metzler_5_parts" and r["image_size"] == SIZE
    assert r["kl"] >= 0 and r["nll"] > 0
    assert r["elbo"] == pytest.approx(-(r["kl"] + r["nll"]), rel=1e-6)
    # The Gaussian NLL at sigma 0.7 is at least its constant, 0.5 log(2 pi 0.49) nats per dimension.
    assert r["nll"] >= 3 * SIZE * SIZE * 0.5 * math.log(2 * math.pi * 0.49) - 1e-3
    assert r["bits_per_dim"] == pytest.approx(-r["elbo"] / (3 * SIZE * SIZE * math.log(2)) + 8)
    assert 0 < r["mae"] <= r["rmse"] < 255
    assert 0 < r["mean_image_mae"] <= r["mean_image_rmse"] < 255
    assert r["rmse_ratio"] == pytest.approx(r["rmse"] / r["mean_image_rmse"])
    assert r["elbo_sigma_0.7"] == pytest.approx(r["elbo"], rel=1e-6)  # the run's σ is the paper's here


def test_the_elbo_is_at_the_runs_own_final_sigma_and_at_the_papers_beside_it(setup):
    tmp, ckpt, test, _ = setup
    state = torch.load(ckpt, weights_only=True)
    state["config"] = {"sigma_f": 0.4}  # a cpu-preset run ends at σ 0.4
    torch.save(state, tmp / "cpu.pt")
    at_04 = run_main(["--checkpoint", str(tmp / "cpu.pt"), "--test_data_dir", test])
    at_07 = run_main(["--checkpoint", ckpt, "--test_data_dir", test])
    assert at_04["sigma"] == 0.4 and at_07["sigma"] == 0.7 and at_04["kl"] == pytest.approx(at_07["kl"])
    # the same prediction: its ELBO at 0.7 computed from the one at 0.4 is what a pass at 0.7 gives
    assert at_04["elbo_sigma_0.7"] == pytest.approx(at_07["elbo"], rel=1e-5)
    assert at_04["elbo"] != pytest.approx(at_07["elbo"], rel=1e-3)


def test_results_repeat_exactly_and_elbo_does_not_depend_on_batch_size(setup):
    tmp, ckpt, test, _ = setup
    a = run_main(["--checkpoint", ckpt, "--test_data_dir", test, "--batch_size", "2"])
    b = run_main(["--checkpoint", ckpt, "--test_data_dir", test, "--batch_size", "2"])
    c = run_main(["--checkpoint", ckpt, "--test_data_dir", test, "--batch_size", "5"])
    assert a == b
    # The posterior noise is a function of (seed, scene), so the ELBO is the same in any batching.
    for k in ("elbo", "kl", "nll"):
        assert c[k] == pytest.approx(a[k], rel=1e-5)
    d = run_main(["--checkpoint", ckpt, "--test_data_dir", test, "--batch_size", "2", "--seed", "1"])
    assert d["elbo"] != a["elbo"]
    e = run_main(["--checkpoint", ckpt, "--test_data_dir", test, "--batch_size", "2", "--max_scenes", "2"])
    assert e["scenes"] == 2


def test_several_context_sizes_samples_and_plot(setup):
    tmp, ckpt, test, train = setup
    argv = ["--checkpoint", ckpt, "--test_data_dir", test, "--train_data_dir", train, "--batch_size", "2",
            "--context", "3", "1", "2", "--samples", "4", "--plot", str(tmp / "p.png"), "--json", str(tmp / "r.json")]
    r = run_main(argv)
    assert json.loads((tmp / "r.json").read_text()) == r
    assert r["contexts"] == [1, 2, 3] and set(r["by_context"]) == {"1", "2", "3"}
    assert r["scenes"] == 5 and r["samples"] == 4 and r["step"] == 7 and "rmse" not in r
    for k, c in r["by_context"].items():
        assert c["context"] == int(k) and c["kl"] >= 0
        for prefix in ("", "mean_of_samples_", "best_of_samples_", "mean_image_"):
            assert 0 < c[prefix + "mae"] <= c[prefix + "rmse"] < 255
            assert 0 < c[prefix + "psnr"] < 60 and -1 < c[prefix + "ssim"] < 1
        assert c["best_of_samples_rmse"] <= c["rmse"]  # per image, the best draw is no worse than draw 0
    with Image.open(tmp / "p.png") as im:
        assert im.format == "PNG" and 600 <= im.width <= 2000 and 400 <= im.height <= 2000
    assert run_main(argv) == r  # the same seed repeats every score
    # Each size reports what it reports alone; draw 0 is --samples 1's draw.
    alone = run_main(["--checkpoint", ckpt, "--test_data_dir", test, "--train_data_dir", train,
                      "--batch_size", "2", "--context", "2"])
    assert alone["samples"] == 1 and "best_of_samples_rmse" not in alone
    two = r["by_context"]["2"]
    assert {"mae", "rmse", "psnr", "ssim", "elbo", "mean_image_ssim", "rmse_ratio"} <= set(two) & set(alone)
    assert all(two[k] == alone[k] for k in two if k in alone)


def test_samples_1_scores_the_draw_evaluate_always_made(setup):
    """Draw 0 of batch b comes from a generator seeded with seed * 1000003 + b, as before --samples existed;
    every image score is per image, then averaged over images."""
    tmp, ckpt, test, _ = setup
    r = run_main(["--checkpoint", ckpt, "--test_data_dir", test, "--batch_size", "5", "--seed", "2"])
    model, _ = checkpoint.load_model(ckpt)
    x, v, x_q, v_q, _ = next(iter(torch.utils.data.DataLoader(
        evaluate.FixedViews(GQNDataset(test), 3, 2), batch_size=5)))
    with torch.no_grad():
        pred = model.generate(x / 255, v, v_q, generator=torch.Generator().manual_seed(2 * 1_000_003)) * 255
    scores = metrics.image_scores(pred.clamp(0, 255), x_q.float())
    for k in ("mae", "rmse", "psnr", "ssim"):  # per image, then averaged over images
        assert r[k] == pytest.approx(scores[k].mean().item(), rel=1e-6)


def test_volume_checkpoint_scores_repeat_in_any_batching(tmp_path):
    """The volume representation samples fixed depths in evaluation: scores repeat and ignore the batching."""
    test = make_data(tmp_path / "test", scenes=5)
    ckpt = str(make_checkpoint(tmp_path / "v.pt", representation="volume"))
    a = run_main(["--checkpoint", ckpt, "--test_data_dir", str(test), "--batch_size", "2"])
    b = run_main(["--checkpoint", ckpt, "--test_data_dir", str(test), "--batch_size", "5"])
    for k in ("elbo", "kl", "nll"):  # the posterior noise is a function of (seed, scene), as for the others
        assert b[k] == pytest.approx(a[k], rel=1e-5)
    assert run_main(["--checkpoint", ckpt, "--test_data_dir", str(test), "--batch_size", "2"]) == a
    assert a["scenes"] == 5 and 0 < a["rmse"] < 255


def test_stored_size_of_training_data_is_resized(tmp_path):
    # Training resized 32x32 data to the model's 16x16: evaluation does the same.
    test = make_data(tmp_path / "test", scenes=2, size=2 * SIZE)
    ckpt = make_checkpoint(tmp_path / "c.pt", image_size=SIZE, data_size=2 * SIZE)
    r = run_main(["--checkpoint", str(ckpt), "--test_data_dir", str(test)])
    assert r["scenes"] == 2 and r["image_size"] == SIZE


def one_error(capsys, argv):
    return main_error(run_main, argv, capsys)


def test_checkpoint_that_does_not_match_the_data(tmp_path, capsys):
    test = str(make_data(tmp_path / "test", scenes=2))
    other = make_checkpoint(tmp_path / "c32.pt", image_size=2 * SIZE)
    err = one_error(capsys, ["--checkpoint", str(other), "--test_data_dir", test])
    assert err.startswith("error: --test_data_dir") and "16x16" in err and "32x32" in err
    v5 = make_checkpoint(tmp_path / "v5.pt", v_dim=5)
    err = one_error(capsys, ["--checkpoint", str(v5), "--test_data_dir", test])
    assert err.startswith("error: --test_data_dir") and "5-d viewpoints" in err


def test_bad_input_gets_one_line(setup, capsys):
    tmp, ckpt, test, _ = setup
    err = one_error(capsys, ["--checkpoint", str(tmp / "nope.pt"), "--test_data_dir", test])
    assert err == f"error: --checkpoint {tmp / 'nope.pt'}: no such checkpoint file"
    (tmp / "junk.pt").write_bytes(b"not a checkpoint")
    err = one_error(capsys, ["--checkpoint", str(tmp / "junk.pt"), "--test_data_dir", test])
    assert err.startswith(f"error: --checkpoint {tmp / 'junk.pt'}: not a loadable checkpoint")
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", str(tmp / "missing")])
    assert err.startswith("error: --test_data_dir") and "missing" in err
    (tmp / "empty").mkdir()
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", str(tmp / "empty")])
    assert err.startswith("error: --test_data_dir") and "empty" in err
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", test, "--context", "6"])
    assert err.startswith("error: --context 6")
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", test, "--batch_size", "0"])
    assert "--batch_size" in err
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", test, "--context", "2", "0"])
    assert err == "error: --context: expected a positive integer, got '0'"
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", test, "--context", "1", "6"])
    assert err.startswith("error: --context 6")
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", test, "--samples", "0"])
    assert err == "error: --samples: expected a positive integer, got '0'"
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", test, "--plot", str(tmp / "p.jpg")])
    assert err == f"error: --plot {tmp / 'p.jpg'}: must end in .png"
    (tmp / "dir.png").mkdir()
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", test, "--plot", str(tmp / "dir.png")])
    assert err.startswith(f"error: --plot {tmp / 'dir.png'}: is a folder")
    (tmp / "file").write_text("")
    err = one_error(capsys, ["--checkpoint", ckpt, "--test_data_dir", test, "--plot", str(tmp / "file" / "p.png")])
    assert err.startswith(f"error: --plot {tmp / 'file' / 'p.png'}: cannot write")


def test_end_of_training_report_reaches_tensorboard(setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboardX import SummaryWriter

    tmp, ckpt, test, train = setup
    model, _ = checkpoint.load_model(ckpt)
    writer = SummaryWriter(logdir=str(tmp / "tb"))
    r = evaluate.end_of_training(writer, 7, model, GQNDataset(train), GQNDataset(test), progress=False)
    writer.close()
    assert r["scenes"] == 5 and "rmse_ratio" in r
    events = EventAccumulator(str(tmp / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {"eval/rmse", "eval/mean_image_rmse", "eval/rmse_ratio", "eval/elbo", "eval/psnr", "eval/ssim",
            "eval/mean_image_psnr", "eval/mean_image_ssim"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/rmse")[0].value == pytest.approx(r["rmse"], rel=1e-5)
    assert events.Tags()["images"] == ["eval/novel_views/scene_0", "eval/novel_views/scene_4"]


def test_evaluate_with_the_readmes_command_repeats_train_pys_end_of_run_scores(data, tmp_path):
    """The README's evaluate.py command (no --seed, no --baseline_scenes) on a run whose seed was drawn gives the
    scores the run printed at its end: the run's seed chooses the views and noise, and the mean image averages the
    same scenes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train
    from conftest import args

    argv = args(data, tmp_path, "drawn", 3)
    i = argv.index("--seed")
    train.main(argv[:i] + argv[i + 2:])  # no --seed: drawn and recorded
    run = tmp_path / "drawn"
    seed = json.loads((run / "config.json").read_text())["seed"]
    events = EventAccumulator(str(run))
    events.Reload()
    r = run_main(["--checkpoint", str(run / "checkpoints" / "latest.pt"), "--test_data_dir", data[1],
                  "--train_data_dir", data[0]])
    assert r["seed"] == seed
    for key in ("rmse", "mean_image_rmse", "rmse_ratio", "elbo"):
        assert r[key] == pytest.approx(events.Scalars(f"eval/{key}")[0].value, rel=1e-6), key
