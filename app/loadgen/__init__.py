"""Load generator and ledger verifier: `python -m app.loadgen run|verify`.

`run_load` needs only the standard library, so it runs from any Python;
`verify` reads Postgres, Redis and S3 and so needs the app's requirements,
which are imported only when it is called.
"""

from __future__ import annotations

import os

from app.loadgen.client import LoadgenError
from app.loadgen.report import LatencySummary, MissingWrite, Report, VerifyReport, format_report, format_verify
from app.loadgen.workload import run_load


def verify(ledger: str | os.PathLike[str], config: str | os.PathLike[str]) -> VerifyReport:
    """Check every acknowledged write in `ledger` against the stores named by
    the app config file `config`."""
    from app.loadgen.verify import verify_ledger

    return verify_ledger(ledger, config)


__all__ = [
    "LatencySummary",
    "LoadgenError",
    "MissingWrite",
    "Report",
    "VerifyReport",
    "format_report",
    "format_verify",
    "run_load",
    "verify",
]
