"""Convert DeepMind's gqn-datasets TFRecords to the converted format of gqn_dataset.py, without TensorFlow.

The data sets are those of Eslami et al. 2018 (supplementary "Datasets"); each record is one scene of S views
(`frames`: S JPEGs, `cameras`: S x (x, y, z, yaw, pitch)). JPEG bytes are copied as they are (no re-encoding),
cameras become the 7-d viewpoint v = (x, y, z, sin yaw, cos yaw, sin pitch, cos pitch) of data_reader.py.

    python dataset/convert2torch.py SRC_ROOT DST_ROOT [--datasets NAME ...] [--workers N]

SRC_ROOT is laid out as gsutil downloads it (`<dataset>/<train|test>/001-of-900.tfrecord`, any subset of the
files); the output is `DST_ROOT/<dataset>/<train|test>/001-of-900.pt`, one file per shard, each written
atomically. A second run skips shards already converted. Damaged shards are named (file, record, what is wrong),
the others still convert, and the run exits with status 1.
"""
import argparse
import multiprocessing
import os
import sys

import numpy as np
import simplejpeg

if not __package__:  # `python dataset/convert2torch.py`: the repository's modules, one folder up
    import _repo  # noqa: F401
from dataset.tfrecord import TFRecordError, parse_example, read_records  # noqa: E402
from cameras import pose7  # noqa: E402
from cli import ArgumentParser, UserError, main as cli_main, one_line, positive_int  # noqa: E402
from gqn_dataset import DATASETS, foreign_shards, write_shard  # noqa: E402
from progress import progress_bar  # noqa: E402

SPLITS = ("train", "test")


def convert_shard(src, dst, dataset):
    """Convert one TFRecord shard to one converted .pt file. Raises TFRecordError naming file and record."""
    info = DATASETS[dataset]
    s, size = info["views"], info["image_size"]
    frames, cameras = [], []
    for index, data in enumerate(read_records(src)):
        try:
            features = parse_example(data)
        except ValueError as e:
            raise TFRecordError(f"{src}: record {index}: {one_line(e)}") from None
        jpegs, cams = features.get("frames", []), features.get("cameras", [])
        if len(jpegs) != s or len(cams) != s * 5:
            raise TFRecordError(f"{src}: record {index}: expected {s} frames and {s * 5} camera values for "
                                f"{dataset}, found {len(jpegs)} and {len(cams)}")
        if not all(isinstance(f, bytes) for f in jpegs) or any(isinstance(c, bytes) for c in cams):
            raise TFRecordError(f"{src}: record {index}: frames must be a bytes list and cameras a list of numbers")
        cams = np.asarray(cams, dtype=np.float32)
        if not np.isfinite(cams).all():  # never in DeepMind's data; NaN poses would only surface as a NaN loss
            raise TFRecordError(f"{src}: record {index}: a camera value is not finite")
        if index == 0:  # one header per shard: catches a folder of the wrong data set without slowing conversion
            try:
                h, w, _, _ = simplejpeg.decode_jpeg_header(jpegs[0])
            except ValueError as e:
                raise TFRecordError(f"{src}: record {index}: frame 0 is not a JPEG ({e})") from None
            if (h, w) != (size, size):
                raise TFRecordError(f"{src}: record {index}: frames are {w}x{h}, {dataset} has {size}x{size}")
        frames.append(jpegs)
        cameras.append(cams)
    if not frames:
        raise TFRecordError(f"{src}: record 0: the file holds no records")
    cameras = pose7(np.asarray(cameras, dtype=np.float32).reshape(len(frames), s, 5))
    write_shard(dst, frames, cameras, dataset, size, source="gqn-datasets")
    return len(frames)


def _job(args):
    src, dst, dataset, nbytes = args
    try:
        return src, convert_shard(src, dst, dataset), None, nbytes
    except TFRecordError as e:
        return src, 0, str(e), nbytes
    except OSError as e:
        return src, 0, f"{e.filename or src}: {e.strerror or e}", nbytes
    except Exception as e:  # anything else still gets one line, and the other shards go on
        return src, 0, f"{src}: {type(e).__name__}: {e}", nbytes


def remove_stale_temp_files(folder):
    """Delete the hidden `.tmp-*.pt` files a killed run left in an output folder (write_shard's temp names)."""
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(".tmp-") and f.endswith(".pt"):
                os.unlink(os.path.join(folder, f))


def find_shards(src_root, dst_root, datasets=None):
    """-> (jobs [(src, dst, dataset, bytes)], skipped count, warnings). Raises UserError for bad folders/names."""
    if not os.path.isdir(src_root):
        raise UserError(f"SRC_ROOT {src_root} is not a folder")
    for name in datasets or []:
        if name not in DATASETS:
            raise UserError(f"--datasets: unknown data set {name!r} (known: {', '.join(sorted(DATASETS))})")
    folders = sorted(n for n in os.listdir(src_root) if os.path.isdir(os.path.join(src_root, n)))
    if any(n in SPLITS for n in folders) and os.path.basename(os.path.normpath(src_root)) in DATASETS:
        raise UserError(f"SRC_ROOT {src_root} is a data set folder; pass the folder above it")
    warnings, jobs, skipped, found = [], [], 0, False
    for name in folders:
        if name not in DATASETS:
            warnings.append(f"{os.path.join(src_root, name)}: not a gqn-datasets name, skipped "
                            f"(known: {', '.join(sorted(DATASETS))})")
            continue
        if datasets and name not in datasets:
            continue
        for split in SPLITS:
            folder = os.path.join(src_root, name, split)
            if not os.path.isdir(folder):
                continue
            remove_stale_temp_files(os.path.join(dst_root, name, split))
            other = foreign_shards(os.path.join(dst_root, name, split), "gqn-datasets")
            if other:
                raise UserError(f"DST_ROOT {dst_root}: {os.path.join(dst_root, name, split)} holds another data set "
                                f"of the same name, {other}; convert into another folder")
            for f in sorted(os.listdir(folder)):
                if not f.endswith(".tfrecord"):
                    continue
                found = True
                src = os.path.join(folder, f)
                dst = os.path.join(dst_root, name, split, f[:-len(".tfrecord")] + ".pt")
                if os.path.exists(dst):  # written atomically, so existing means finished
                    skipped += 1
                else:
                    jobs.append((src, dst, name, os.path.getsize(src)))
    for name in datasets or []:
        if not os.path.isdir(os.path.join(src_root, name)):
            raise UserError(f"--datasets: no folder {os.path.join(src_root, name)}")
    if not found:
        unknown = f" (unknown folders: {', '.join(w.split(':')[0] for w in warnings)})" if warnings else ""
        raise UserError(f"{src_root} holds no <dataset>/<train|test>/*.tfrecord files of a known data set{unknown}")
    return jobs, skipped, warnings


def convert(src_root, dst_root, datasets=None, workers=1):
    """Convert everything under src_root -> list of error lines (empty when all shards converted)."""
    jobs, skipped, warnings = find_shards(src_root, dst_root, datasets)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    errors, done, scenes = [], 0, 0
    bar = progress_bar(total=sum(j[3] for j in jobs), unit="B", unit_scale=True, desc="converting")
    # Big shards first: the pool's tail is then short ones.
    jobs.sort(key=lambda j: -j[3])
    pool = multiprocessing.Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap_unordered(_job, jobs) if pool else map(_job, jobs)
        for src, n, error, nbytes in results:
            bar.update(nbytes)
            if error:
                errors.append(error)
                bar.write(f"error: {error}", file=sys.stderr)
            else:
                done += 1
                scenes += n
    finally:
        bar.close()
        if pool:
            pool.terminate()
    print(f"converted {done} shards ({scenes} scenes), skipped {skipped} already converted, "
          f"{len(errors)} failed -> {dst_root}", file=sys.stderr)
    return errors


def run(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src_root", metavar="SRC_ROOT", help="folder holding <dataset>/<split>/*.tfrecord")
    parser.add_argument("dst_root", metavar="DST_ROOT", help="output folder (<dataset>/<split>/*.pt)")
    parser.add_argument("--datasets", nargs="+", metavar="NAME", help="only these data sets (default: all found)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="parallel processes (default: all cores)")
    args = parser.parse_args(argv)
    errors = convert(args.src_root, args.dst_root, args.datasets, args.workers)
    if errors:
        print(f"{len(errors)} shard(s) failed:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    cli_main(run, argv, interrupted="interrupted; finished shards are kept, run again to continue")


if __name__ == "__main__":
    main()
