"""Thin shim: ``python cli.py ...`` is the same as ``flowscope ...``."""

from flowscope.cli.main import run

if __name__ == "__main__":
    run()
