"""`igops --help` against `python -c pass`: how much start-up igops adds. Goals: at most 2x
`python -c pass`, and at most 150 ms. `igops hosts --help` shows what a command that goes
through typer costs (igops.launcher answers the root's help and the version without it)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import Run, median_of, run  # noqa: E402

RUNS = 21


def main() -> None:
    igops = str(Path(sys.executable).with_name("igops"))
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "igops --version": [igops, "--version"],
        "igops --help": [igops, "--help"],
        "igops hosts --help": [igops, "hosts", "--help"],
    }
    for argv in commands.values():
        run(argv)  # warm the page cache
    # Interleaved, so that a change in the machine's load falls on all of them alike.
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    for _ in range(RUNS):
        for name, argv in commands.items():
            runs[name].append(run(argv))
    medians = {name: median_of(found) for name, found in runs.items()}
    baseline = medians["python -c pass"].wall
    print(f"cli_startup: median of {RUNS} interleaved runs")
    for name, measured in medians.items():
        print(f"  {name:<19} {measured.wall * 1000:7.1f} ms   {measured.wall / baseline:4.1f}x python")
    help_wall = medians["igops --help"].wall
    met = help_wall <= 2 * baseline and help_wall <= 0.150
    print(f"  goal: igops --help at most 2x python and 150 ms: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
