"""dataset/download.py against a local HTTP server on 127.0.0.1 serving the fixture TFRecords."""
import http.server
import os
import threading

import pytest

from conftest import main_error
from dataset import download

SM5 = "shepard_metzler_5_parts"


class _Bucket(http.server.BaseHTTPRequestHandler):
    """Serves files under `root` like a storage bucket, honouring `Range: bytes=N-` unless told not to."""

    root, honour_range, cut_first, requests = None, True, set(), []

    def do_GET(self):
        type(self).requests.append((self.path, self.headers.get("Range")))
        path = os.path.join(self.root, self.path.lstrip("/"))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        start = 0
        if self.honour_range and self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].rstrip("-"))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.path in self.cut_first:  # drop the connection half-way, once
            self.cut_first.discard(self.path)
            body = body[:len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def bucket(fixtures_dir, monkeypatch):
    handler = type("Handler", (_Bucket,), {"root": os.path.join(fixtures_dir, "gqn-tfrecord"),
                                          "cut_first": set(), "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _fixture(fixtures_dir, split, name):
    return open(os.path.join(fixtures_dir, "gqn-tfrecord", SM5, split, name), "rb").read()


def test_shard_names_follow_data_reader():
    assert download.shard_names(SM5, "train")[:2] == ["001-of-900.tfrecord", "002-of-900.tfrecord"]
    assert len(download.shard_names(SM5, "train")) == 900
    assert download.shard_names("mazes", "train", 0.001) == ["0001-of-1080.tfrecord", "0002-of-1080.tfrecord"]
    assert download.shard_names("jaco", "test", 0.01)[-1] == "004-of-400.tfrecord"


def test_download_fraction_then_skip(bucket, fixtures_dir, tmp_path, capsys):
    handler, url = bucket
    download.main([SM5, "--fraction", "0.001", "--dst", str(tmp_path), "--base_url", url])
    out = capsys.readouterr().out
    for split, name in (("train", "001-of-900.tfrecord"), ("test", "001-of-100.tfrecord")):
        assert (tmp_path / SM5 / split / name).read_bytes() == _fixture(fixtures_dir, split, name)
    assert [p for p, _ in handler.requests] == [f"/{SM5}/train/001-of-900.tfrecord", f"/{SM5}/test/001-of-100.tfrecord"]
    assert f"python dataset/convert2torch.py {tmp_path} data --datasets {SM5}" in out
    assert not list(tmp_path.rglob("*.part"))
    download.main([SM5, "--fraction", "0.001", "--dst", str(tmp_path), "--base_url", url])
    assert len(handler.requests) == 2  # finished files are not fetched again


def test_resume_partial_download(bucket, fixtures_dir, tmp_path):
    handler, url = bucket
    want = _fixture(fixtures_dir, "train", "001-of-900.tfrecord")
    path = tmp_path / "001-of-900.tfrecord"
    (tmp_path / "001-of-900.tfrecord.part").write_bytes(want[:1000])  # left by an interrupted run
    download.fetch(f"{url}/{SM5}/train/001-of-900.tfrecord", str(path))
    assert handler.requests == [(f"/{SM5}/train/001-of-900.tfrecord", "bytes=1000-")]
    assert path.read_bytes() == want and not (tmp_path / "001-of-900.tfrecord.part").exists()


def test_dropped_connection_is_resumed(bucket, fixtures_dir, tmp_path):
    handler, url = bucket
    handler.cut_first.add(f"/{SM5}/train/001-of-900.tfrecord")
    want = _fixture(fixtures_dir, "train", "001-of-900.tfrecord")
    path = tmp_path / "001-of-900.tfrecord"
    download.fetch(f"{url}/{SM5}/train/001-of-900.tfrecord", str(path))
    assert [r for _, r in handler.requests] == [None, f"bytes={len(want) // 2}-"]
    assert path.read_bytes() == want


def test_server_without_range_support(bucket, fixtures_dir, tmp_path):
    handler, url = bucket
    handler.honour_range = False
    want = _fixture(fixtures_dir, "test", "001-of-100.tfrecord")
    (tmp_path / "f.tfrecord.part").write_bytes(b"junk" * 10)
    download.fetch(f"{url}/{SM5}/test/001-of-100.tfrecord", str(tmp_path / "f.tfrecord"))
    assert (tmp_path / "f.tfrecord").read_bytes() == want  # restarted from zero, not appended


def test_errors_are_one_line(bucket, tmp_path, capsys):
    _, url = bucket
    with pytest.raises(SystemExit) as e:
        download.main([SM5, "--fraction", "0.01", "--dst", str(tmp_path), "--base_url", url])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1] == f"error: {url}/{SM5}/train/002-of-900.tfrecord: HTTP 404 Not Found"
    assert (tmp_path / SM5 / "train" / "001-of-900.tfrecord").exists()  # what did arrive is kept
    for args, what in (([" lego"], "unknown data set ' lego'"), ([SM5, "--fraction", "0"], "--fraction must be")):
        main_error(download.main, args + ["--dst", str(tmp_path), "--base_url", url], capsys, what)
