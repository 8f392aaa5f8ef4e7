"""``jaxnets-benchmark --suite input``: jaxnets' input pipelines against torchvision's ``DataLoader`` and a plain
tf.data pipeline, on the same image folder and the same cores, timed side by side in one process.

    jaxnets-benchmark --suite input --synthetic 2000        # writes ImageNet-like JPEGs (500x375, quality 90) first
    jaxnets-benchmark --suite input --data ~/imagenet        # a folder of class subfolders (train/ used if present)
    jaxnets-benchmark --suite input --tiny                   # seconds: the tests run it

Pipelines (batches of ``--batch-size`` at ``--image-size`` px, float32 NHWC, normalized; every core this process
may use):

- **jaxnets train**: ``load_dataset(...).train_batches``: RandomResizedCrop + flip + normalize, a JPEG's crop window
  decoded alone (``transforms.decode_window``); **jaxnets train, whole decode**: the same batches with every file
  decoded whole first (``IndexedSplit.window_decode=False``), the path before window decoding;
- **jaxnets train, tuned**: the same batches under the tf.data settings ``tuned(cores)`` (``tuned_train``), against
  the pipeline's own, so that a report states which won;
- **jaxnets eval**: ``eval_batches``: resize the shorter side, center crop (TensorFlow's resize);
- **torchvision train / eval**: ``DataLoader(ImageFolder)`` (PIL decoding), ``num_workers`` = cores, with
  ``RandomResizedCrop(antialias=True)`` + ``RandomHorizontalFlip`` + ``Normalize``, and ``Resize`` + ``CenterCrop``;
- **tf.data anchor**: the classic TensorFlow ImageNet input: ``sample_distorted_bounding_box`` +
  ``decode_and_crop_jpeg`` + bilinear resize without antialiasing + flip + normalize, tf.data's defaults; and the
  same **antialiased**, jaxnets' (and PIL's) resize: the like-for-like anchor.

Each round builds every pipeline afresh, skips ``--warmup`` batches (worker start-up, buffers filling) and times
``--batches``; the pipelines take turns within a round. Each is measured in wall-clock images/s and in images per
CPU second of its process and worker processes (``/proc``): on a machine shared with other work the wall-clock
rate swings 2-4x from round to round, the CPU rate a few percent. Rates are the median over rounds; ratios the
median of each round's ratio. The report projects the rate per CPU second to a ``HOST_CORES``-core GPU host
against a ResNet-50 training step's appetite (``GPU_APPETITE``), assuming the rate scales with the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxnets import errors
from jaxnets.benchmark import timing

PROG = "python -m jaxnets.benchmark --suite input"
GPU_APPETITE = (3000, 4000)  # images/s of a ResNet-50 bfloat16 train step on one H100 (issue 29)
HOST_CORES = 16  # cores a GPU host gives one GPU's input pipeline, at most (8-16)
SYNTHETIC_SIZE = (500, 375)  # width, height: ImageNet's typical photo
SYNTHETIC_QUALITY = 90
SYNTHETIC_CLASSES = 10
RAM_BUDGET = 2 << 30  # bytes: tf.data autotune's budget for buffers in TUNED
GOALS = {"jaxnets train / torchvision train": 1.5, "jaxnets train / tf.data anchor": 1.0,
         "jaxnets eval / torchvision eval": 1.2}  # issue 29


@dataclasses.dataclass(frozen=True)
class Tuning:
    """tf.data settings of a train pipeline variant: ``None`` leaves tf.data's default."""

    parallel_calls: int | None = None  # the augmentation map's parallelism (default AUTOTUNE)
    private_threads: int | None = None  # a private thread pool of this size for the pipeline
    cpu_budget: int | None = None  # cores autotune may plan for
    ram_budget: int | None = None  # autotune's RAM budget in bytes
    prefetch: int | None = None  # batches prefetched (default AUTOTUNE)


def tuned(cores: int) -> Tuning:
    """The tuned settings for ``cores`` cores: a private thread pool and autotune's CPU budget sized to them, the
    map's parallelism and the prefetching chosen by autotune under a RAM budget."""
    return Tuning(private_threads=cores, cpu_budget=cores, ram_budget=RAM_BUDGET)


@dataclasses.dataclass
class Row:
    """One pipeline, round by round: wall seconds and CPU seconds (its process and worker processes) to deliver
    ``images`` images."""

    name: str
    what: str
    images: int
    times: list[float]
    cpu: list[float]

    @property
    def images_per_s(self) -> float:
        return self.images / statistics.median(self.times)

    @property
    def images_per_cpu_s(self) -> float | None:
        """Images per CPU second: the rate of one core given to the pipeline alone, which other work on the
        machine slows far less than the wall-clock rate. None where CPU time cannot be read (no ``/proc``)."""
        cpu = [c for c in self.cpu if c > 0]
        return self.images / statistics.median(cpu) if cpu else None

    def as_dict(self, cores: int) -> dict:
        return {**dataclasses.asdict(self), "images_per_s": self.images_per_s,
                "images_per_s_per_core": self.images_per_s / cores, "images_per_cpu_s": self.images_per_cpu_s}


def cpu_seconds() -> tuple[float, dict[int, float]]:
    """CPU seconds of this process and its reaped children, and of each live child process (torchvision's
    workers), read from ``/proc`` (empty where there is none)."""
    import resource

    own = time.process_time() + sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in
                                    ("ru_utime", "ru_stime"))
    children: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for listing in Path("/proc/self/task").glob("*/children"):
        for pid in listing.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited since
                continue
            children[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return own, children


def cpu_since(start: tuple[float, dict[int, float]]) -> float:
    """CPU seconds used by this process and its children since ``start`` (``cpu_seconds()``)."""
    own, children = cpu_seconds()
    return own - start[0] + sum(seconds - start[1].get(pid, 0.0) for pid, seconds in children.items())


def write_synthetic(root: Path, count: int, size: tuple[int, int] = SYNTHETIC_SIZE, seed: int = 0) -> Path:
    """``count`` ImageNet-like JPEGs (``size`` = width, height; quality ``SYNTHETIC_QUALITY``, PIL's default 4:2:0
    chroma) in ``SYNTHETIC_CLASSES`` class folders under ``root``: smooth shapes plus sensor-like noise, so that
    files are about as large as ImageNet's (~100 kB at 500x375)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        image += rng.normal(0, 20, image.shape)
        folder = root / f"class{index % SYNTHETIC_CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{index:06d}.jpg",
                                                                      quality=SYNTHETIC_QUALITY)
    return root


def image_root(folder: Path) -> Path:
    """The class folders a pipeline reads: ``folder/train`` when there is one (jaxnets trains on it), else
    ``folder``."""
    return folder / "train" if (folder / "train").is_dir() else folder


def endless(epoch: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
    """Epoch after epoch of ``epoch(n)``'s batches."""
    n = 0
    while True:
        yield from epoch(n)
        n += 1


def jaxnets_pipelines(folder: Path, image_size: int, batch_size: int, cores: int
                      ) -> dict[str, tuple[str, Callable[[], Iterator[Any]]]]:
    """jaxnets' train pipeline (window decoding, whole decoding, tuned) and eval pipeline on ``folder``."""
    from jaxnets.data import DataConfig, load_dataset

    config = DataConfig(dataset=str(folder), image_size=image_size, batch_size=batch_size, val_fraction=0.1)
    dataset = load_dataset(config)
    whole = dataclasses.replace(dataset, train=dataclasses.replace(dataset.train, window_decode=False))
    settings = tuned(cores)
    return {
        "jaxnets train": ("`load_dataset(...).train_batches`: JPEG crop window decoded alone",
                          lambda: endless(dataset.train_batches)),
        "jaxnets train, whole decode": ("the same batches, every file decoded whole first (before this change)",
                                        lambda: endless(whole.train_batches)),
        "jaxnets train, tuned": (f"the same batches under tf.data settings {describe(settings)}",
                                 lambda: endless(lambda epoch: tuned_train(dataset, epoch, settings))),
        "jaxnets eval": ("`eval_batches`: resize the shorter side, center crop (TensorFlow)",
                         lambda: endless(lambda _: dataset.eval_batches("train"))),
    }


def describe(settings: Tuning) -> str:
    """``settings`` in words, for the report."""
    parts = [f"{field.name}={getattr(settings, field.name)}" for field in dataclasses.fields(settings)
             if getattr(settings, field.name) is not None]
    return ", ".join(parts) or "tf.data's defaults"


def tuned_train(dataset: Any, epoch: int, settings: Tuning) -> Iterator[dict[str, np.ndarray]]:
    """``dataset.train_batches(epoch)``'s batches (the same pixels: the same examples and augmentation) through a
    tf.data pipeline under ``settings``: what ``Dataset`` would run if it adopted them."""
    from jaxnets.data.lazy_tf import tf
    from jaxnets.data.split import epoch_seed
    from jaxnets.data.transforms import augmentation

    cfg = dataset.config
    ds = dataset.train.train_examples(cfg.batch_size, dataset.shard, cfg.seed, epoch, 0)
    augment = augmentation(cfg, epoch_seed(cfg.seed, epoch))
    ds = ds.map(lambda image, label, pos: {"image": augment(image, pos), "label": label},
                num_parallel_calls=settings.parallel_calls or tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(dataset.local_batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    if settings.private_threads:
        options.threading.private_threadpool_size = settings.private_threads
    if settings.cpu_budget:
        options.autotune.cpu_budget = settings.cpu_budget
    if settings.ram_budget:
        options.autotune.ram_budget = settings.ram_budget
    return ds.with_options(options).prefetch(settings.prefetch or tf.data.AUTOTUNE).as_numpy_iterator()


def anchor_pipeline(folder: Path, image_size: int, batch_size: int, antialias: bool = False
                    ) -> Callable[[], Iterator[Any]]:
    """The classic TensorFlow ImageNet training input (tf.data defaults, no jaxnets code): a crop drawn by
    ``sample_distorted_bounding_box``, ``decode_and_crop_jpeg``, bilinear resize (without antialiasing, as that
    input has it, unless ``antialias``), flip, normalize."""
    from jaxnets.data.lazy_tf import tf
    from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD

    root = image_root(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(str(path), label) for label, name in enumerate(classes) for path in sorted((root / name).rglob("*.jpg"))]
    paths, labels = np.array([p for p, _ in files]), np.array([label for _, label in files], np.int32)
    mean, std = tf.constant(IMAGENET_MEAN) * 255.0, tf.constant(IMAGENET_STD) * 255.0

    def parse(path: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        data = tf.io.read_file(path)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(data), tf.zeros([0, 0, 4], tf.float32), min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, (image_size, image_size), "bilinear", antialias=antialias)
        image = tf.image.random_flip_left_right(image)
        return {"image": (image - mean) / std, "label": label}

    def epoch(n: int) -> Iterator[Any]:
        ds = tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(paths), seed=n)
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True)
        return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    return lambda: endless(epoch)


def torchvision_pipelines(folder: Path, image_size: int, batch_size: int, workers: int
                          ) -> dict[str, tuple[str, Callable[[], Iterator[Any]]]]:
    """torchvision's train and eval ``DataLoader`` on ``folder`` (ImageFolder: PIL), ``workers`` processes."""
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    from jaxnets.eval_transform import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

    sizes = EvalTransform().at_crop(image_size)
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *tail])
    evaluate = v2.Compose([v2.Resize(sizes.resize_size, antialias=True), v2.CenterCrop(sizes.crop_size), *tail])
    root = image_root(folder)

    def loader(transform: Any, shuffle: bool) -> Callable[[], Iterator[Any]]:
        dataset = datasets.ImageFolder(str(root), transform=transform)
        return lambda: endless(lambda _: iter(torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=True)))
    return {"torchvision train": (f"`DataLoader(ImageFolder)`, PIL, {workers} workers: RandomResizedCrop + flip + "
                                  "normalize", loader(train, True)),
            "torchvision eval": (f"the same, Resize({sizes.resize_size}) + CenterCrop({sizes.crop_size})",
                                 loader(evaluate, False))}


def measure(pipelines: dict[str, tuple[str, Callable[[], Iterator[Any]]]], warmup: int, batches: int, rounds: int,
            batch_size: int) -> list[Row]:
    """Each pipeline's seconds for ``batches`` batches after ``warmup``, in turns, ``rounds`` times."""
    rows = {name: Row(name, what, batches * batch_size, [], []) for name, (what, _) in pipelines.items()}
    for round_index in range(rounds):
        for name, (_, make) in pipelines.items():
            iterator = make()
            for _ in range(warmup):
                next(iterator)
            start, cpu_start = time.perf_counter(), cpu_seconds()
            for _ in range(batches):
                next(iterator)
            rows[name].times.append(time.perf_counter() - start)
            rows[name].cpu.append(cpu_since(cpu_start))
            del iterator  # stops its threads or worker processes before the next pipeline runs
            print(f"round {round_index + 1}/{rounds} {name}: {rows[name].images / rows[name].times[-1]:.0f} images/s, "
                  f"{rows[name].images / max(rows[name].cpu[-1], 1e-9):.0f} per CPU second", flush=True)
    return list(rows.values())


def ratio(rows: Sequence[Row], over: str, under: str, cpu: bool = False) -> float | None:
    """The median over rounds of ``over``'s speed over ``under``'s in the same round: wall-clock, or (``cpu``) per
    CPU second (None where CPU time was not read)."""
    by_name = {row.name: row for row in rows}
    pairs = zip(*(by_name[name].cpu if cpu else by_name[name].times for name in (over, under)), strict=True)
    values = [u / o for o, u in pairs if o > 0 and u > 0]
    return statistics.median(values) if values else None


def _number(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(rows: Sequence[Row], context: dict) -> str:
    """The report: one row per pipeline, the ratios against the goals, and the projection to a GPU host."""
    cores = context["cores"]
    lines = [f"Input pipelines, {context['images']} images ({context['image_source']}, "
             f"{context['mean_file_kb']:.0f} kB on average), batch {context['batch_size']} at {context['image_size']} "
             f"px, {cores} cores of {context['machine']}, {context['date']}; median of {context['rounds']} rounds of "
             f"{context['batches']} batches. Per core: wall-clock images/s over {cores} cores, and images per CPU "
             "second (the process and its workers: what one core would give the pipeline alone).", "",
             "| pipeline | images/s | per core (wall) | per CPU second | what |", "|---|---:|---:|---:|---|"]
    lines += [f"| {row.name} | {row.images_per_s:.0f} | {row.images_per_s / cores:.0f} | "
              f"{_number(row.images_per_cpu_s)} | {row.what} |" for row in rows]
    lines += ["", "| ratio | wall-clock | per CPU second | goal |", "|---|---:|---:|---:|"]
    names = {row.name for row in rows}
    pairs = [("jaxnets train", "jaxnets train, whole decode"), ("jaxnets train", "torchvision train"),
             ("jaxnets train", "tf.data anchor"), ("jaxnets train", "tf.data anchor, antialiased"),
             ("jaxnets train, tuned", "jaxnets train"), ("jaxnets train, tuned", "tf.data anchor"),
             ("jaxnets train, tuned", "torchvision train"), ("jaxnets eval", "torchvision eval")]
    for over, under in pairs:
        if over in names and under in names:
            goal = GOALS.get(f"{over} / {under}")
            lines.append(f"| {over} / {under} | {_number(ratio(rows, over, under), 2)} | "
                         f"{_number(ratio(rows, over, under, cpu=True), 2)} | {'' if goal is None else f'>= {goal}'} |")
    if {"jaxnets train", "jaxnets train, tuned"} <= names:
        gain = ratio(rows, "jaxnets train, tuned", "jaxnets train", cpu=True) or ratio(rows, "jaxnets train, tuned",
                                                                                        "jaxnets train")
        winner = ("the tuned settings won" if gain > 1.03 else "the pipeline's own settings won" if gain < 0.97
                  else "neither won by more than 3 %")
        lines += ["", f"tf.data settings: {context['tuned']} against the pipeline's own: {gain:.2f}x; {winner}."]
    train = [row for row in rows if row.name.startswith("jaxnets train")]
    best = max(train, key=lambda row: row.images_per_cpu_s or row.images_per_s / cores)
    per_core = best.images_per_cpu_s or best.images_per_s / cores
    projected = per_core * HOST_CORES
    low, high = GPU_APPETITE
    verdict = ("keeps up with" if projected >= high else "keeps up with the low end of" if projected >= low
               else f"feeds {projected / high:.0%}-{projected / low:.0%} of")
    lines += ["", f"Projected to {HOST_CORES} such cores at {per_core:.0f} images/s each, {best.name} delivers "
                  f"{projected:.0f} images/s: it {verdict} one H100's ResNet-50 bfloat16 training step "
                  f"({low:,}-{high:,} images/s)."]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = errors.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, default=None, help="a folder of class subfolders of images (its train/ "
                                                                "when it has one)")
    source.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help="write N ImageNet-like JPEGs (500x375, quality 90) to a temporary folder and use it "
                             "(default 2000; --tiny 32 of 96x72)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (32 JPEGs of 96x72, 32 px, batch 8, one round "
                                                            "of 2 batches): tests the script in seconds")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; --tiny 32")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64; --tiny 8")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per pipeline and round (default 5; "
                                                                 "--tiny 1)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per pipeline and round (default 20; "
                                                                  "--tiny 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, every pipeline once in each (default 3; "
                                                                 "--tiny 1)")
    parser.add_argument("--workers", type=int, default=None, help="torchvision's DataLoader workers (default: the "
                                                                  "cores this process may use)")
    timing.add_report_flags(parser)
    args = parser.parse_args(argv)
    timing.fill_defaults(args, {"image_size": (32, 224), "batch_size": (8, 64), "warmup": (1, 5), "batches": (2, 20),
                                "rounds": (1, 3)})
    if args.data is None and args.synthetic is None:
        args.synthetic = 32 if args.tiny else 2000
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data: {args.data} is not a folder")
    timing.check_at_least(parser, args, {"image_size": 1, "batch_size": 1, "batches": 1, "rounds": 1, "synthetic": 1,
                                         "workers": 1, "warmup": 0})
    return args


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """The input pipeline benchmark; the exit status."""
    return timing.run_suite(argv, prog, parse_args, _main)


def _main(args: argparse.Namespace) -> int:
    import torchvision  # noqa: F401 -- before TensorFlow: torch imported after it crashes (triton, torch 2.14)

    from jaxnets.benchmark.models import device_description

    cores = timing.num_threads()
    workers = args.workers or cores
    with tempfile.TemporaryDirectory(prefix="jaxnets-input-") as scratch:
        if args.data is None:
            size = (96, 72) if args.tiny else SYNTHETIC_SIZE
            print(f"writing {args.synthetic} JPEGs of {size[0]}x{size[1]} to {scratch}", flush=True)
            folder = write_synthetic(Path(scratch), args.synthetic, size)
            image_source = f"synthetic JPEGs {size[0]}x{size[1]}, quality {SYNTHETIC_QUALITY}"
        else:
            folder, image_source = args.data.expanduser(), str(args.data)
        pipelines = jaxnets_pipelines(folder, args.image_size, args.batch_size, cores)
        pipelines.update(torchvision_pipelines(folder, args.image_size, args.batch_size, workers))
        pipelines["tf.data anchor"] = ("`decode_and_crop_jpeg` of a `sample_distorted_bounding_box` window, bilinear "
                                       "resize without antialiasing, tf.data defaults",
                                       anchor_pipeline(folder, args.image_size, args.batch_size))
        pipelines["tf.data anchor, antialiased"] = ("the same with jaxnets' (and PIL's) antialiased resize",
                                                    anchor_pipeline(folder, args.image_size, args.batch_size, True))
        rows = measure(pipelines, args.warmup, args.batches, args.rounds, args.batch_size)
        files = [path.stat().st_size for path in image_root(folder).rglob("*") if path.is_file()]
        images, mean_kb = len(files), sum(files) / max(1, len(files)) / 1000
    context = {"date": time.strftime("%Y-%m-%d"), "machine": device_description(), "cores": cores,
               "workers": workers, "images": images, "mean_file_kb": mean_kb,
               "image_source": image_source, "image_size": args.image_size,
               "batch_size": args.batch_size, "rounds": args.rounds, "batches": args.batches, "warmup": args.warmup,
               "tuned": describe(tuned(cores)), "command": args.command}
    print(flush=True)
    timing.write_report(args, markdown(rows, context), {"context": context, "rows": [r.as_dict(cores) for r in rows]})
    return 0
