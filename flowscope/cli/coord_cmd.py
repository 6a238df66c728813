"""``flowscope coord-check MODULE:FACTORY``: the μP coordinate check of a user's model
(:mod:`flowscope.doctor.coordcheck`), registered in :mod:`flowscope.cli.main`.

Example:
    $ flowscope coord-check mypkg.models:make_model --widths 64,128,256,512 --steps 5 \\
        --input-shape 64,32
    coordinate check (sp), widths 64, 128, 256, 512, steps 0..5: ...
    UNSTABLE: 3 layer(s) grow with width
    ...

Exit status: 0 when every layer is width-stable, 1 when a layer's slope exceeds
``--threshold`` (or on an error), 2 for a usage error.
"""

from __future__ import annotations

import re
import sys

import click

from flowscope.cli.errors import check_device, check_out_dir, clean_errors


def _widths(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) < 2 or not all(re.fullmatch(r"[0-9]+", p) and int(p) >= 1 for p in parts):
        raise click.BadParameter(
            f"{text!r}: allowed: two or more comma-separated integers >= 1, e.g. 64,128,256",
            param_hint="'--widths'",
        )
    widths = [int(p) for p in parts]
    if len(set(widths)) < len(widths):
        raise click.BadParameter(f"{text!r} repeats a width", param_hint="'--widths'")
    return widths


@click.command("coord-check")
@click.argument("target", metavar="MODULE:FACTORY")
@click.option(
    "--widths", default="64,128,256,512", show_default=True, help="Comma-separated widths."
)
@click.option("--steps", type=click.IntRange(min=1, max=1000), default=5, show_default=True)
@click.option(
    "--input-shape",
    "shape",
    required=True,
    help="Input shape, batch first, e.g. 64,32 (the same at every width).",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--mup", is_flag=True, help="Apply μP (Adam) by the layer-order rule first.")
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Largest allowed slope of log size vs log width after the first update.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
@click.option(
    "--out", "out_dir", default=None, help="Folder for sizes.csv, slopes.csv and the figure."
)
@clean_errors
def coord_cmd(
    target: str,
    widths: str,
    steps: int,
    shape: str,
    lr: float,
    optimizer: str,
    mup: bool,
    threshold: float,
    seed: int,
    device: str,
    out_dir: str | None,
) -> None:
    """Train FACTORY(width) a few steps at each width; say which layers blow up with width.

    FACTORY is ``package.module:function``, called with one argument, the width; it returns
    the model (the width changes its hidden layers only). The loss is the mean squared error
    to fixed random targets; every layer's activation rms is recorded at every step.
    """
    from flowscope.cli.doctor_cmd import load_factory, parse_shape

    sizes = _widths(widths)
    if mup and optimizer != "adam":
        raise click.BadParameter("--mup needs --optimizer adam", param_hint="'--mup'")
    dims = parse_shape(shape)
    if len(dims) < 2:
        raise click.BadParameter(
            f"{shape!r}: allowed: batch first and at least one more size, e.g. 64,32",
            param_hint="'--input-shape'",
        )
    where = check_out_dir(out_dir) if out_dir is not None else None
    device = check_device(device)
    factory, _ = load_factory(target)  # called with the width: checked by coord_check

    from flowscope.doctor.coordcheck import coord_check

    result = coord_check(
        factory,  # type: ignore[arg-type]
        sizes,
        input_shape=dims[1:],
        batch=dims[0],
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        parametrization="mup" if mup else "sp",
        threshold=threshold,
        seed=seed,
        device=device,
    )
    click.echo(result.summary())
    if where is not None:
        import matplotlib

        matplotlib.use("Agg")
        from flowscope.reporter.export import csv_text
        from flowscope.reporter.plots.width import coord_plot

        where.mkdir(parents=True, exist_ok=True)
        (where / "sizes.csv").write_text(csv_text(result.sizes))
        (where / "slopes.csv").write_text(csv_text(result.slopes))
        coord_plot(result.sizes).savefig(where / "coord_check.png", dpi=100)
        click.echo(f"written: {where / 'coord_check.png'}, sizes.csv, slopes.csv")
    if not result.ok:
        sys.exit(1)
