"""The ``flowscope`` command line (click). Heavy imports happen inside commands only."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from flowscope import __version__
from flowscope.cli.errors import check_out_dir, clean_errors
from flowscope.core.errors import FlowscopeError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowscope")
def main() -> None:
    """flowscope: see how signal and gradients flow through a PyTorch network."""


@main.group()
def study() -> None:
    """List, show and run studies (built-in names or your own TOML files)."""


@study.command("list")
@clean_errors
def study_list() -> None:
    """The built-in studies, with the source each reproduces."""
    from flowscope.study import spec

    for name in spec.builtin_names():
        raw = spec.read(name)
        source = raw.get("source", {})
        click.echo(
            f"{name:<14} {raw.get('title', '')}  [{source.get('file', '')}"
            f" lines {source.get('lines', '')}]"
        )


@study.command("show")
@click.argument("name_or_file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field.")
@clean_errors
def study_show(name_or_file: str, overrides: tuple[str, ...]) -> None:
    """Print a study's resolved spec, its grid size and its claims."""
    import json

    from flowscope.study import spec

    loaded = spec.load(name_or_file, overrides)
    click.echo(json.dumps(loaded.to_dict(), indent=2, default=str))
    click.echo(f"# {len(loaded.configs())} configs; {len(loaded.claims)} claims", err=True)


@study.command("schema")
@clean_errors
def study_schema() -> None:
    """Print the JSON schema of a study file (for editors; see docs/STUDIES.md)."""
    import json

    from flowscope.study.spec_models import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@study.command("page")
@click.argument("name_or_file")
@clean_errors
def study_page(name_or_file: str) -> None:
    """Print a study's page: its sweep and each claim's measured quantity, test and origin
    (the built-in studies' pages are docs/studies/NAME.md)."""
    from flowscope.study import pages, spec

    click.echo(pages.study_page(spec.load(name_or_file)), nl=False)


@study.command("run")
@click.argument("name_or_file")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where tensors live (default: the study's run.device, cpu).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder (default: reports/<study name>).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a field, e.g. --set net.depth=5 --set run.steps=10.",
)
@click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--fresh", is_flag=True, help="Discard finished configs in --out first.")
@click.option("--no-report", is_flag=True, help="Skip report.html.")
@clean_errors
def study_run(
    name_or_file: str,
    device: str | None,
    out_dir: str | None,
    overrides: tuple[str, ...],
    seeds: str | None,
    fresh: bool,
    no_report: bool,
) -> None:
    """Run a study; finished configs in --out are kept, so a rerun resumes."""
    from tqdm import tqdm

    from flowscope.study import spec
    from flowscope.study.engine import resolve_device, run_study

    extra = list(overrides)
    if seeds is not None:
        try:
            extra.append(f"run.seeds=[{','.join(str(int(s)) for s in seeds.split(','))}]")
        except ValueError:
            raise FlowscopeError(f"--seeds takes integers like 0,1,2; got {seeds!r}") from None
    loaded = spec.load(name_or_file, extra)
    for name in sorted({device} if device else {c.run["device"] for c in loaded.configs()}):
        resolve_device(name)  # CUDA asked for where there is none: before any work
    out = check_out_dir(out_dir or Path("reports") / loaded.name)
    with tqdm(
        total=len(loaded.configs()), desc=loaded.name, unit="config", file=sys.stderr, disable=None
    ) as bar:

        def progress(done: int, total: int, config_id: str) -> None:
            bar.set_postfix_str(config_id[:40])
            bar.update(done - bar.n)

        result = run_study(loaded, out, device=device, fresh=fresh, progress=progress)
    _print_claims(result.claims)
    if not no_report:
        _write_report(out)
    click.echo(
        f"run folder: {out}  ({result.ran} configs run now, "
        f"{len(result.configs) - result.ran} resumed)"
    )
    if result.failed:
        raise click.ClickException(
            f"{len(result.failed)} config(s) failed: "
            + "; ".join(f"{c['config']}: {c['error']}" for c in result.failed[:3])
        )


def _print_claims(claims: list) -> None:
    for verdict in claims:
        mark = "NOT held" if verdict.status == "not held" else verdict.status
        origin = "" if verdict.origin == "lecture" else f" ({verdict.origin}'s claim)"
        seeds = verdict.numbers.get("seeds", 1)
        over = f" [{seeds} seeds]" if seeds > 1 else ""
        click.echo(f"[{mark:>12}] {verdict.id}{origin}{over}: {verdict.detail}")


def _write_report(out: Path) -> None:
    from flowscope.reporter.page import report

    click.echo(f"report: {report(out)}")


def _register() -> None:
    from flowscope.cli.compare_cmd import compare_cmd
    from flowscope.cli.coord_cmd import coord_cmd
    from flowscope.cli.doctor_cmd import doctor_cmd
    from flowscope.cli.report_cmd import report_cmd

    main.add_command(report_cmd)
    main.add_command(doctor_cmd)
    main.add_command(coord_cmd)
    main.add_command(compare_cmd)


_register()


def run() -> None:
    """Console-script entry point."""
    main(prog_name="flowscope")


if __name__ == "__main__":  # pragma: no cover
    run()
