"""One error contract for every command, and a module graph without cycles."""
import ast
import os

import pytest

from conftest import ROOT, run_script, script_error

# Each command with its required arguments, so that the flag under test is the one at fault.
COMMANDS = {"train.py": [], "evaluate.py": ["--checkpoint", "c.pt", "--test_data_dir", "d"],
            "render.py": ["--checkpoint", "c.pt", "--data_dir", "d", "--out", "x.png"], "bench.py": [],
            "bench_data.py": [], "dataset/convert2torch.py": ["src", "dst"], "dataset/download.py": ["jaco"],
            "dataset/shepard_metzler.py": ["--out", "o", "--train_scenes", "1", "--test_scenes", "1"],
            "dataset/import_scenes.py": ["src", "dst"], "dataset/export_scenes.py": ["out", "--layout", "csv"],
            "view.py": [], "bench_view.py": [], "plot_kl.py": ["runs/x"]}


@pytest.mark.parametrize("script", COMMANDS)
def test_every_command_refuses_unknown_and_abbreviated_flags_in_one_line(script, tmp_path):
    # --work is a prefix of --workers (or of nothing): argparse would take it as --workers unless told not to. cli's
    # parser compares each flag with its own exactly, so one unknown prefix tests both refusals in one process.
    script_error(run_script(script, *COMMANDS[script], "--work", "1", cwd=tmp_path), "unrecognized arguments: --work")


@pytest.mark.parametrize("script,argv,words", [
    ("train.py", ["--batch_size", "0"], ["--batch_size: expected a positive integer, got '0'"]),
    ("train.py", ["--depth_samples", "0"], ["--depth_samples: expected a positive integer, got '0'"]),
    ("train.py", ["--cell_rays", "0"], ["--cell_rays: expected a positive integer, got '0'"]),
    ("evaluate.py", ["--checkpoint", "c.pt", "--test_data_dir", "d", "--batch_size", "0"], ["--batch_size"]),
    ("render.py", ["--checkpoint", "c.pt", "--data_dir", "d", "--out", "x.jpg"], ["--out x.jpg", ".png or .gif"]),
    ("bench.py", ["--layers", "0"], ["--layers"]),
    ("dataset/shepard_metzler.py", ["--out", "o", "--train_scenes", "-1", "--test_scenes", "1"], ["--train_scenes"]),
    ("dataset/download.py", [], ["NAME"]),
    ("dataset/import_scenes.py", ["src", "dst", "--background", "grey"], ["--background: invalid choice"]),
    ("dataset/import_scenes.py", ["src", "dst"], ["SRC src is not a folder"]),
    ("dataset/export_scenes.py", ["out"], ["--layout"]),
    ("view.py", ["--port", "0"], ["--port: expected a port, 1 to 65535, got '0'"]),
    ("view.py", [], ["--checkpoint runs/default/checkpoints/latest.pt: no such checkpoint file"]),
    ("bench_view.py", ["--cameras", "0"], ["--cameras"]),
    ("plot_kl.py", ["no_such_run", "--out", "k.png"], ["no_such_run: no such run folder"]),
])
def test_bad_values_and_missing_arguments_get_one_line(script, argv, words, tmp_path):
    script_error(run_script(script, *argv, cwd=tmp_path), *words)


def project_imports():
    """module -> the project's modules it imports (anywhere in the file, lazily or not)."""
    files = {f[:-3]: f for f in os.listdir(ROOT) if f.endswith(".py")}
    files.update({f"dataset.{f[:-3]}": os.path.join("dataset", f) for f in os.listdir(os.path.join(ROOT, "dataset"))
                  if f.endswith(".py") and f != "__init__.py"})
    graph = {}
    for name, path in files.items():
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for n in names:
                for candidate in (n, f"dataset.{n}"):  # scripts in dataset/ import their neighbours bare
                    if candidate in files and candidate != name:
                        found.add(candidate)
                        break
        graph[name] = found
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = project_imports()
    assert {"cli", "config", "distributed", "cameras", "pictures", "metrics"} <= set(graph)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    cycles = sorted(m for m in graph if reaches(m, m))
    assert cycles == [], f"import cycles through {cycles}"
    assert graph["cli"] == set()  # the bottom: every module may import it
    assert "render" not in graph["evaluate"] and "evaluate" not in graph["render"]
