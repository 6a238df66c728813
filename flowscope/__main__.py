"""``python -m flowscope ...`` is the same as ``flowscope ...``."""

from flowscope.cli.main import run

run()
