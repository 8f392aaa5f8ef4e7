"""Start-up of an image-folder dataset: listing the files and checking that each will decode, timed.

    python benchmarks/folder_startup.py                      # 10,000 32x32 JPEG/PNG files in /tmp
    python benchmarks/folder_startup.py --count 2000 --size 500x375

Generates ``--count`` small images (half JPEG, half PNG, 10 class folders) once under ``--root``, then times
``jaxnets.data.folder.load`` (the listing and the check of every file) ``--repeat`` times in this process, after
importing TensorFlow (which a training run imports anyway), and prints the best time. The files stay in the page
cache between repeats, as they do for a run started twice.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, count: int, size: tuple[int, int], classes: int = 10) -> Path:
    """``count`` images of ``size`` (width, height) under ``root/<class>/``; reused when already there."""
    stamp = root / f".done-{count}-{size[0]}x{size[1]}"
    if stamp.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(count):
        directory = root / f"class{i % classes}"
        directory.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize(size)  # smooth: compresses like a photo
        image.save(directory / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    stamp.touch()
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", default="32x32", help="WIDTHxHEIGHT")
    parser.add_argument("--root", default=None, help="default: /tmp/jaxnets-folder-startup-COUNT-SIZE")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(n) for n in args.size.split("x"))
    root = make_folder(Path(args.root or f"/tmp/jaxnets-folder-startup-{args.count}-{args.size}"), args.count, size)

    from jaxnets.data import DataConfig, folder, tf

    tf.constant(0)  # TensorFlow imported before timing: a training run imports it anyway
    config = DataConfig(dataset=str(root), image_size=32, batch_size=32)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        source = folder.load(config, 1)
        times.append(time.perf_counter() - start)
    kept = len(source.train) + len(source.val)
    print(f"{args.count} files of {args.size}: listing + checking {min(times):.2f} s best of {args.repeat} "
          f"({', '.join(f'{t:.2f}' for t in times)}); {kept} kept, {min(times) / args.count * 1e6:.0f} us per file")


if __name__ == "__main__":
    main()
