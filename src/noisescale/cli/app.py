"""Entry point of the ``noisescale`` command: one subcommand per module of this package."""

from __future__ import annotations

import typer

from noisescale.cli.branch import branch
from noisescale.cli.fit import fit
from noisescale.cli.measure import measure
from noisescale.cli.predict import predict
from noisescale.cli.schedule import schedule
from noisescale.cli.sweep import sweep

app = typer.Typer(
    help="Gradient noise scale and critical batch size for PyTorch training (McCandlish et al. 2018).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(measure)
app.command()(fit)
app.command()(predict)
app.command()(sweep)
app.command()(branch)
app.command()(schedule)


def main() -> None:
    """Run the command line."""
    app()
