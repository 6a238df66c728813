"""``flowscope report RUN_DIR``: the click command (registered in :mod:`flowscope.cli.main`).

Imports nothing heavy at module level, so ``flowscope --help`` stays instant.

Example:
    $ flowscope report reports/init-scales
    reports/init-scales/report.html
"""

from __future__ import annotations

from pathlib import Path

import click

from flowscope.cli.errors import check_out_dir, clean_errors


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Folder for report.html and its CSV files (default: RUN_DIR).",
)
@clean_errors
def report_cmd(run_dir: str, out_dir: str | None) -> None:
    """Write RUN_DIR/report.html: verdicts, claims and per-layer figures, self-contained.

    RUN_DIR is a folder written by ``fs.watch(...).save()`` or ``flowscope study run``.
    Prints the path of the report.
    """
    from flowscope.reporter.page import report

    if out_dir is not None:
        check_out_dir(out_dir)
    elif Path(run_dir).is_dir():  # the report goes into RUN_DIR itself
        check_out_dir(run_dir, "RUN_DIR")
    click.echo(str(report(run_dir, out_dir)))
