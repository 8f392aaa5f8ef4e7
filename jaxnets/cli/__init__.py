"""The command-line tools: argparse -> library calls, errors reported by ``jaxnets.errors.run_cli``."""
