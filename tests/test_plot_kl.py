"""plot_kl.py draws the KL of train.py runs from their TensorBoard logs."""
import pytest
from PIL import Image

import plot_kl
import train
from conftest import args


def test_the_kl_of_two_runs_in_one_png(data, tmp_path, capsys):
    for name in ("a", "b"):
        train.main(args(data, tmp_path, name, 6, "--sigma_f", "0.5" if name == "b" else "2.0"))
    out = tmp_path / "kl.png"
    plot_kl.main([str(tmp_path / "a") + "=first", str(tmp_path / "b"), "--out", str(out)])
    assert Image.open(out).size == (1200, 450)
    sigma = plot_kl.scalars(str(tmp_path / "b"), ("schedule/sigma",))["schedule/sigma"]
    assert [st for st, _ in sigma] == [3, 6] and sigma[-1][1] < sigma[0][1]  # what the σ panel draws
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a folder that is no run: one line naming it
        plot_kl.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: no TensorBoard scalars train/kl and "
                                               f"schedule/sigma (not a train.py run?)")
    assert not (tmp_path / "x.png").exists()


def test_the_object_score_of_runs_on_the_rooms_against_the_step(room_data, tmp_path, capsys):
    train.main(args(room_data, tmp_path, "rooms", 6))
    out = tmp_path / "objects.png"
    plot_kl.main([str(tmp_path / "rooms") + "=volume", "--object_score", "--out", str(out)])
    assert Image.open(out).size == (1800, 450)
    score = plot_kl.scalars(str(tmp_path / "rooms"), ("test/object_score",))["test/object_score"]
    assert [st for st, _ in score] == [3, 6] and all(v > 0 for _, v in score)
