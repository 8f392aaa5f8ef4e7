"""jaxnets against torchvision, timed side by side: ``python -m jaxnets.benchmark`` (``jaxnets-benchmark``).

A tool on top of the library, never a part of it: it imports jaxnets (and torch, lazily), and nothing in
jaxnets imports it but its command (``jaxnets.cli.benchmark``), so the library's import graph stays free of torch
and of the benchmark.

- ``timing``: what both measurements share (the cores, the clock, torchvision's models);
- ``models``: whole training and inference steps of a model, the command's default;
- ``conv_timing``: each convolution of a model alone (``--conv-layers``);
- ``__main__``: a shim; the command is ``jaxnets.cli.benchmark``.
"""
