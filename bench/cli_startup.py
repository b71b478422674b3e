"""`igops --help` against `python -c pass`: how much start-up igops adds. Goal: at most 150 ms."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import median_of, run  # noqa: E402

RUNS = 21


def main() -> None:
    igops = str(Path(sys.executable).with_name("igops"))
    for _ in range(3):
        run([igops, "--help"])
    baseline = median_of([run([sys.executable, "-c", "pass"]) for _ in range(RUNS)])
    help_run = median_of([run([igops, "--help"]) for _ in range(RUNS)])
    version_run = median_of([run([igops, "--version"]) for _ in range(RUNS)])
    print(f"cli_startup: median of {RUNS} runs")
    print(f"  python -c pass   {baseline.wall * 1000:7.1f} ms")
    print(f"  igops --version  {version_run.wall * 1000:7.1f} ms")
    print(
        f"  igops --help     {help_run.wall * 1000:7.1f} ms   ratio {help_run.wall / baseline.wall:.1f}x "
        f"python; goal <= 150 ms: {'met' if help_run.wall <= 0.150 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
