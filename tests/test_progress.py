"""Progress in a log file: whole lines every so often, never carriage-return redraws piling up into one line."""
import io
import os
import subprocess
import sys
import types

import progress
from conftest import ROOT, args


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


def test_a_bar_in_a_file_writes_a_line_every_so_often_and_a_short_task_none(monkeypatch):
    now = [0.0]  # the bar's clock, moved by the test: a quarter of a second a step
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    out = NotATerminal()
    bar = progress.progress_bar(total=30, desc="train", unit="step", file=out, mininterval=0)
    for i in range(30):
        now[0] += progress.LINE_EVERY / 4
        bar.update(1)
        if i == 15:
            progress.write_line("step 16 | a log line", file=out)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "step 16 | a log line" in lines
    counts = [line.split()[1] for line in lines if line.startswith("train: ")]
    assert counts == [f"{n}/30" for n in range(4, 30, 4)] + ["30/30"]  # one every LINE_EVERY seconds, and the end
    quick = NotATerminal()
    for _ in progress.progress_bar(range(3), desc="quick", file=quick):
        pass
    assert quick.getvalue() == ""


def test_train_py_writing_to_a_file_has_no_redraws(data, tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args(data, tmp_path, "run", 6)],
                           stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert r.returncode == 0, text[-2000:]
    assert "\r" not in text and "Done: 6 steps" in text
