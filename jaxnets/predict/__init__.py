"""Classify images with pretrained or fine-tuned weights: ``jaxnets-predict`` / ``python -m jaxnets.predict``.

    python -m jaxnets.predict --model resnet50 --top 5 cat.jpg dog.png
    python -m jaxnets.predict --weights runs/resnet18-flowers/final_weights.safetensors photos/*.jpg
    python -m jaxnets.predict --model resnet50 --weights IMAGENET1K_V2 cat.jpg
    python -m jaxnets.predict --model resnet18 --weights multilabel.safetensors --threshold 0.4 photo.jpg

The work is ``jaxnets.predict.classification`` (which weights, their eval transform, the batched forward pass, top-K or
thresholded classes); the command's home is ``jaxnets.cli.predict``.
"""

from jaxnets.predict.classification import (
    above_threshold,
    batch_logits,
    category_names,
    center_crop,
    chunks,
    classify,
    eval_transform,
    is_multi_label,
    load_input,
    make_forward,
    open_weights,
    preprocess,
    read_image,
    sigmoid,
    softmax,
    top_k,
    weights_path,
)

__all__ = [
    "above_threshold", "batch_logits", "category_names", "center_crop", "chunks", "classify", "eval_transform",
    "is_multi_label", "load_input", "make_forward", "open_weights", "preprocess", "read_image", "sigmoid", "softmax",
    "top_k", "weights_path",
]
