"""Command line: python -m app.loadgen run ... | verify ..."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from app.loadgen import LoadgenError, format_report, format_verify, run_load, verify

EXIT_OK = 0
EXIT_FAILED = 1  # verify found missing writes, or run exceeded --max-errors
EXIT_UNUSABLE = 2  # bad arguments, or the run or check could not be carried out
EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.loadgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="drive a mixed workload and record acknowledged writes in a ledger")
    run.add_argument("--url", required=True, help="base URL of the service, e.g. http://127.0.10.10")
    run.add_argument("--rate", type=float, required=True, help="target requests per second of the timed phase")
    run.add_argument("--duration", type=float, required=True, help="length of the timed phase in seconds")
    run.add_argument("--ledger", required=True, help="JSON-lines file that acknowledged writes are appended to")
    run.add_argument("--users", type=int, default=50, help="users created in the setup phase (default 50)")
    run.add_argument("--write-ratio", type=float, default=0.7, help="share of writes in the timed phase (default 0.7)")
    run.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (default 16)")
    run.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds (default 10)")
    run.add_argument("--seed", type=int, default=None, help="random seed, for repeatable operation mixes")
    run.add_argument("--max-errors", type=int, default=None, help="exit 1 when more requests than this fail")
    run.add_argument("--json", action="store_true", help="print the report as one JSON object")

    check = commands.add_parser("verify", help="check that every write in a ledger is in the stores")
    check.add_argument("--ledger", required=True)
    check.add_argument("--config", required=True, help="the app's TOML config (IGOPS_APP_CONFIG)")
    check.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    # SIGINT ends the timed phase and prints the report. A shell without job control starts its
    # background commands with SIGINT ignored, and Python then raises no KeyboardInterrupt: the
    # load would run on for its whole duration, whoever asked it to stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            report = run_load(
                url=args.url,
                rate=args.rate,
                duration=args.duration,
                ledger=args.ledger,
                users=args.users,
                write_ratio=args.write_ratio,
                concurrency=args.concurrency,
                timeout=args.timeout,
                seed=args.seed,
            )
            print(json.dumps(report.to_dict()) if args.json else format_report(report))
            return EXIT_FAILED if args.max_errors is not None and report.errors > args.max_errors else EXIT_OK
        result = verify(args.ledger, args.config)
        print(json.dumps(result.to_dict()) if args.json else format_verify(result))
        return EXIT_OK if result.ok else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (LoadgenError, OSError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except Exception as exc:
        # verify talks to Postgres, Redis and S3; any of them can refuse
        print(f"loadgen: {args.command} could not complete: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE


if __name__ == "__main__":
    sys.exit(main())
