"""Progress in a log file: whole lines every so often, never carriage-return redraws piling up into one line."""
import io
import os
import subprocess
import sys
import time

import progress
from conftest import ROOT, args


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


def test_a_bar_in_a_file_writes_a_line_every_so_often_and_a_short_task_none(monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.1)
    out = NotATerminal()
    bar = progress.progress_bar(total=30, desc="train", unit="step", file=out)
    for i in range(30):
        time.sleep(0.01)
        bar.update(1)
        if i == 15:
            progress.write_line("step 16 | a log line", file=out)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "step 16 | a log line" in lines
    assert 2 <= sum(line.startswith("train: ") for line in lines) <= 5  # about one per 0.1 s of 0.3 s, and the end
    assert lines[-1].startswith("train: 30/30 step")
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
