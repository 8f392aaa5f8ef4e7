"""Explanations of what a model looks at: class activation maps (``cam``, pytorch-grad-cam's methods), and the
pictures that show them (``overlay`` on the original image, ``contact_sheet`` for a group)."""

from jaxnets.explain.cam import METHODS, cam, target_nodes
from jaxnets.explain.pictures import caption, confidence_extremes, contact_sheet, overlay

__all__ = ["METHODS", "cam", "caption", "confidence_extremes", "contact_sheet", "overlay", "target_nodes"]
