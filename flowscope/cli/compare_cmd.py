"""``flowscope compare RUN_A RUN_B``: two training runs side by side, for people and for CI.

Prints the comparison (:meth:`RunComparison.summary`) on stdout and writes
``compare.html`` into ``--out``. Exit status: 0 when run B has no problem that run A does
not have, 1 when it has one (or the page could not be written), 2 for bad input (a missing
folder, one that holds no flowscope run, a bad option). Imports nothing heavy at module
level, so ``flowscope --help`` stays instant.

Example:
    $ flowscope compare reports/baseline reports/candidate --out reports/cmp
    A: baseline (2000 recorded steps, last 1999): healthy at the last step
    ...
    page: reports/cmp/compare.html
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flowscope.cli.errors import check_out_dir, clean_errors, one_line
from flowscope.core.errors import FlowscopeError


@click.command("compare")
@click.argument("run_a", type=click.Path(path_type=str))
@click.argument("run_b", type=click.Path(path_type=str))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Folder for compare.html (default: reports/compare-<A>-vs-<B>).",
)
@click.option(
    "--factor",
    type=click.FloatRange(min=1.0, min_open=True),
    default=10.0,
    show_default=True,
    help="Call out layers whose activation or dL/dh rms differ by more than this factor.",
)
@clean_errors
def compare_cmd(run_a: str, run_b: str, out_dir: str | None, factor: float) -> None:
    """Compare run B with run A; exit 1 when B has a problem A does not (for CI).

    RUN_A and RUN_B are run folders written by ``fs.watch(model, out=...)`` (or
    ``rec.save``). Problems come from each run's verdict timeline: a check flagging a layer
    at some step. The text summary goes to stdout, the page's path last.
    """
    from flowscope.doctor.runcompare import compare_runs, read_records

    sides = []
    for path, name in ((run_a, "RUN_A"), (run_b, "RUN_B")):
        try:
            sides.append(read_records(path, name))
        except FlowscopeError as err:  # bad input: a usage error (exit 2), not a regression
            raise click.BadParameter(one_line(str(err).removeprefix(f"{name}: ")),
                                     param_hint=name) from None  # fmt: skip
    names = (sides[0][1], sides[1][1])
    out = check_out_dir(out_dir or Path("reports") / f"compare-{names[0]}-vs-{names[1]}")
    try:
        result = compare_runs(sides[0][0], sides[1][0], factor=factor, names=names)
    except FlowscopeError as err:
        raise click.UsageError(one_line(str(err))) from None
    from flowscope.reporter.compare import compare_report

    click.echo(result.summary())
    click.echo(f"page: {compare_report(result, out)}")
    if not result.ok():
        click.echo(
            f"run B ({names[1]}) has {len(result.new)} problem(s) that run A ({names[0]}) "
            "does not: exit status 1",
            err=True,
        )
        sys.exit(1)
