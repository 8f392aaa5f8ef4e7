"""Datasets -> ``tf.data`` pipelines -> per-host numpy batches.

Three sources, one module each: the embedded scikit-learn ``digits``, a ``folder`` of class subfolders, and
any ``tfds`` image-classification dataset; ``sources.SOURCES`` picks one for a dataset name. Every source
gives its examples as ``Split``s (``split``), which ``Dataset`` (``dataset``) batches, augments and evaluates
without knowing where they come from. Digits and folders are *indexed* (``indexed``): one global shuffled
order per epoch, a function of ``(seed, epoch)``, cut into global batches of which each process loads its
slice, so the global batch is the same whatever the number of processes and a resumed run sees the same
data. TFDS datasets are *streamed* (``streamed``): each process reads its own sub-split and shuffles it with
a buffer seeded by ``(seed, epoch)``; deterministic too, but dependent on the number of processes.

The image transforms (decoding, torchvision's random resized crop and eval transform) are in ``transforms``,
the checks that folder images will decode in ``image_checks``. TensorFlow is imported on first use
(``lazy_tf``), and only runs on the CPU.

Every public name is re-exported here: ``from jaxnets.data import DataConfig, load_dataset``.
"""

from jaxnets.data.config import DIGITS, ChannelMismatch, DataConfig, DataError, parse_classes
from jaxnets.data.dataset import Batch, Dataset
from jaxnets.data.folder import VAL_DIRS
from jaxnets.data.indexed import IndexedSplit
from jaxnets.data.labels import SPLIT_SEED
from jaxnets.data.lazy_tf import tf
from jaxnets.data.sources import load_dataset
from jaxnets.data.split import Shard, Source, Split
from jaxnets.data.streamed import SHUFFLE_BUFFER, StreamedSplit
from jaxnets.data.tfds import TfdsSplit
from jaxnets.data.transforms import IMAGE_EXTENSIONS, center_crop, decode_rgb, random_resized_crop, resize_shorter

__all__ = [
    "DIGITS", "IMAGE_EXTENSIONS", "SHUFFLE_BUFFER", "SPLIT_SEED", "VAL_DIRS", "Batch", "ChannelMismatch", "DataConfig",
    "DataError", "Dataset", "IndexedSplit", "Shard", "Source", "Split", "StreamedSplit", "TfdsSplit", "center_crop",
    "decode_rgb", "load_dataset", "parse_classes", "random_resized_crop", "resize_shorter", "tf",
]
