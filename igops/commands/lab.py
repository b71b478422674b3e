"""`igops lab`: the rehearsal fleet on this machine."""

from __future__ import annotations

import typer

app = typer.Typer(help="Bring the lab fleet up or down on this machine's loopback addresses.",
                  no_args_is_help=True)
