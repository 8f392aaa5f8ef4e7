"""Shared test setup.

torch and torchvision are imported before anything imports TensorFlow: in one process, importing
torchvision after tensorflow crashes (seen with torch 2.14 / tensorflow 2.21), and pytest-xdist runs
tests of several files in one worker.
"""

import torch  # noqa: F401
import torchvision  # noqa: F401
