"""Download one of DeepMind's gqn-datasets (the data of Eslami et al. 2018, supplementary "Datasets") over HTTPS.

    python dataset/download.py NAME [--fraction F] [--dst DIR] [--base_url URL]

Fetches `<base_url>/<NAME>/<train|test>/<file>` for the file names of data_reader.py (`001-of-900.tfrecord`,
...), or only the first fraction F of each split's files, into `DIR/<NAME>/<split>/`. Partial downloads are kept
as `<file>.part` and resumed with an HTTP Range request; a file gets its real name only when complete (atomic
rename), so finished files are skipped on the next run. Ends by printing the convert2torch command.
"""
import http.client
import math
import os
import sys
import time
import urllib.error
import urllib.request


if not __package__:  # `python dataset/download.py`: the repository's modules, one folder up
    import _repo  # noqa: F401
from cli import ArgumentParser, UserError, main as cli_main  # noqa: E402
from gqn_dataset import DATASETS  # noqa: E402
from progress import progress_bar, write_line  # noqa: E402

BASE_URL = "https://storage.googleapis.com/gqn-dataset"
CHUNK = 1 << 20
RETRIES = 5


def shard_names(name, split, fraction=1.0):
    """data_reader.py's file names for a split, the first ceil(fraction * count) of them (at least one)."""
    count = DATASETS[name][f"{split}_files"]
    width = len(str(count))
    keep = max(1, math.ceil(fraction * count))
    return [f"{i:0{width}d}-of-{count:0{width}d}.tfrecord" for i in range(1, keep + 1)]


def _open(url, start):
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    return urllib.request.urlopen(request, timeout=60)


def fetch(url, path, desc=None):
    """Download url to path via path + '.part', resuming what an earlier run left there. Returns bytes written."""
    part = path + ".part"
    written = 0
    for attempt in range(RETRIES):
        start = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            with _open(url, start) as response:
                if start and response.status != 206:  # server ignored the Range header: start over
                    start = 0
                length = response.headers.get("Content-Length")
                total = start + int(length) if length is not None else None
                with open(part, "ab" if start else "wb") as f, \
                        progress_bar(total=total, initial=start, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                        written += len(chunk)
            size = os.path.getsize(part)
            if total is not None and size != total:
                raise OSError(f"connection closed after {size} of {total} bytes")
            os.replace(part, path)
            return written
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:  # range starts at the end: the part file is already complete
                os.replace(part, path)
                return written
            if e.code < 500:
                raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # resets, timeouts, short reads
            error = str(getattr(e, "reason", None) or e)
        if attempt + 1 < RETRIES:
            write_line(f"{url}: {error}; retrying (resuming from the partial file)", file=sys.stderr)
            time.sleep(min(2 ** attempt, 30) * 0.5)
    raise UserError(f"{url}: {error} (gave up after {RETRIES} attempts; run again to resume)")


def download(name, dst, fraction=1.0, base_url=BASE_URL, splits=("train", "test")):
    """Fetch the data set's files that are not yet in dst -> number of files fetched."""
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r} (known: {', '.join(sorted(DATASETS))})")
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    jobs = []
    for split in splits:
        for f in shard_names(name, split, fraction):
            path = os.path.join(dst, name, split, f)
            if not os.path.exists(path):
                jobs.append((f"{base_url.rstrip('/')}/{name}/{split}/{f}", path))
    for url, path in progress_bar(jobs, unit="file", desc=f"downloading {name}"):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise UserError(f"--dst: cannot create {os.path.dirname(path)} ({e.strerror or e})") from None
        fetch(url, path, desc=os.path.basename(path))
    return len(jobs)


def run(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(sorted(DATASETS))}")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="fetch only the first fraction of each split's files (default 1: all)")
    parser.add_argument("--dst", default=os.path.join("data", "tfrecord"),
                        help="folder for <NAME>/<split>/*.tfrecord (default data/tfrecord)")
    parser.add_argument("--base_url", "--base-url", default=BASE_URL,
                        help=f"bucket URL (default {BASE_URL}; --base-url also works)")
    args = parser.parse_args(argv)
    n = download(args.name, args.dst, args.fraction, args.base_url)
    print(f"fetched {n} files into {os.path.join(args.dst, args.name)}; now convert them with:")
    print(f"python dataset/convert2torch.py {args.dst} data --datasets {args.name}")


def main(argv=None):
    cli_main(run, argv, interrupted="interrupted; run again to resume")


if __name__ == "__main__":
    main()
