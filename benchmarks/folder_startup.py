"""Start-up of an image-folder dataset: listing the files, checking that each will decode, and the cached index
(``jaxnets.data.folder``) that a resumed run and the other processes read instead, timed.

    python benchmarks/folder_startup.py                      # 10,000 32x32 JPEG/PNG files in 10 classes, in /tmp
    python benchmarks/folder_startup.py --count 2000 --size 500x375
    python benchmarks/folder_startup.py --count 100000 --classes 1000 --repeat 1 --delete   # ImageNet's shape

Generates ``--count`` small images (half JPEG, half PNG, ``--classes`` class folders) once under ``--root``, then
times, after importing TensorFlow (which a training run imports anyway), best of ``--repeat``:

- ``uncached``: ``folder.load`` without a workdir: the listing and the check of every file, on every start;
- ``listing``: the listing alone (what process 0 does on a resumed run, to see that the folder is unchanged);
- ``first scan``: the same load with a workdir and no index in it: listing, checks, index written;
- ``resumed``: the load again: listing, index read (no file decoded);
- ``index read``: what the processes other than 0 do: the index read, no listing.

The files stay in the page cache between repeats, as they do for a run started twice. The last line extrapolates
to ``--extrapolate`` files (ImageNet's 1,281,167) on ``--cores`` cores: the checks decode in parallel on every core,
the listing and the index are read by one thread. ``--delete`` removes the generated folder afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_TRAIN_FILES = 1_281_167


def make_folder(root: Path, count: int, size: tuple[int, int], classes: int = 10) -> Path:
    """``count`` images of ``size`` (width, height) under ``root/<class>/``; reused when already there."""
    stamp = root / f".done-{count}-{size[0]}x{size[1]}-{classes}"
    if stamp.exists():
        return root
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        directory = root / f"class{i % classes:04d}"
        pixels = rng.integers(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize(size)  # smooth: compresses like a photo
        image.save(directory / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    stamp.touch()
    return root


def _best(repeat: int, work, before=None) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return min(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", default="32x32", help="WIDTHxHEIGHT")
    parser.add_argument("--root", default=None, help="default: /tmp/jaxnets-folder-startup-COUNT-SIZE-CLASSES")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--extrapolate", type=int, default=IMAGENET_TRAIN_FILES, help="files to extrapolate to")
    parser.add_argument("--cores", type=int, default=16, help="cores to extrapolate to")
    parser.add_argument("--delete", action="store_true", help="remove the generated folder at the end")
    args = parser.parse_args()
    size = tuple(int(n) for n in args.size.split("x"))
    root = Path(args.root or f"/tmp/jaxnets-folder-startup-{args.count}-{args.size}-{args.classes}")
    start = time.perf_counter()
    make_folder(root, args.count, size, args.classes)
    print(f"folder {root}: {args.count} files in {args.classes} classes ({time.perf_counter() - start:.0f} s to make "
          "or find)", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="jaxnets-folder-startup-workdir-"))
    try:
        _measure(args, root, workdir)
    finally:
        shutil.rmtree(workdir)
        if args.delete:
            shutil.rmtree(root)


def _measure(args: argparse.Namespace, root: Path, workdir: Path) -> None:
    from jaxnets.data import DataConfig, folder, tf

    tf.constant(0)  # TensorFlow imported before timing: a training run imports it anyway
    config = DataConfig(dataset=str(root), image_size=32, batch_size=32)
    index_dir = workdir / folder.INDEX_DIR
    rows = {}
    rows["uncached"] = _best(args.repeat, lambda: folder.load(config, 1))
    rows["listing"] = _best(args.repeat, lambda: folder._list_folder(root, config.in_chans))

    def cached_load():
        with folder.cached_in(workdir):
            return folder.load(config, 1)

    rows["first scan"] = _best(args.repeat, cached_load, before=lambda: shutil.rmtree(index_dir, ignore_errors=True))
    rows["resumed"] = _best(args.repeat, cached_load)
    reader = folder._IndexedScan(root, config.in_chans, index_dir, folder.Peers())
    rows["index read"] = _best(args.repeat, lambda: reader._read_index(None))
    source = rows["resumed"][2]
    kept = len(source.train) + len(source.val)
    index_bytes = sum(f.stat().st_size for f in index_dir.iterdir())
    cores = len(os.sched_getaffinity(0))
    print(f"{args.count} files of {args.size} in {args.classes} classes, {kept} kept; index {index_bytes / 1e6:.1f} "
          f"MB; best of {args.repeat} on {cores} core(s):")
    for name, (best, times, _) in rows.items():
        print(f"  {name:<11} {best:7.2f} s ({', '.join(f'{t:.2f}' for t in times)}), "
              f"{best / args.count * 1e6:6.1f} us per file")
    listing, first, resumed = rows["listing"][0], rows["first scan"][0], rows["resumed"][0]
    scale = args.extrapolate / args.count
    checks = max(first - listing, 0.0) * cores / args.cores  # decoding: parallel over every core
    print(f"extrapolated to {args.extrapolate:,} files on {args.cores} cores (files of this size): first scan "
          f"~{listing * scale + checks * scale:.0f} s (listing {listing * scale:.1f} s + checks and index write "
          f"{checks * scale:.0f} s), resumed ~{resumed * scale:.1f} s, other processes "
          f"~{rows['index read'][0] * scale:.1f} s")


if __name__ == "__main__":
    main()
