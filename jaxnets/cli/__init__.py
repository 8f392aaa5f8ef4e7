"""The six commands, one module each: argparse -> library calls, errors reported by ``jaxnets.errors.run_cli``.

``train`` (``jaxnets-train``), ``convert`` (``jaxnets-convert``), ``predict`` (``jaxnets-predict``), ``evaluate``
(``jaxnets-evaluate``), ``export`` (``jaxnets-export``) and ``benchmark`` (``jaxnets-benchmark``); each ``main`` is
the installed command's entry point (pyproject.toml). ``python train.py``, ``python convert_weights.py`` and
``python -m jaxnets.predict`` / ``.evaluate`` / ``.export`` / ``.benchmark`` are thin shims that call the same
``main``. Nothing imports this package's modules but those shims and the tests; ``benchmark`` alone imports
``jaxnets.benchmark``, which the library never does.
"""
