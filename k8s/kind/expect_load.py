"""Judges a run of k8s/kind/load.py (the JSON line it ends with) against what k8s/kind-smoke.sh expects of it.
Prints each miss on stderr and exits 1; prints nothing and exits 0 when the run is as expected.

    python k8s/kind/expect_load.py '{"requests": 2641, "failed": 0, ...}' --no-losses --versions 1 2 --share 1 0.1 0.6
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", help="load.py's last line")
    parser.add_argument("--no-losses", action="store_true", help="no request failed and none was dropped")
    parser.add_argument(
        "--versions", nargs="+", metavar="VERSION", help="the model versions that answered: exactly these"
    )
    parser.add_argument(
        "--share",
        nargs=3,
        metavar=("VERSION", "LOW", "HIGH"),
        help="VERSION answered between LOW and HIGH (fractions) of the right answers",
    )
    args = parser.parse_args(argv)
    misses = judge(args.summary, args.no_losses, args.versions, args.share)
    for miss in misses:
        print(f"expected of the load run: {miss}", file=sys.stderr)
    return 1 if misses else 0


def judge(line: str, no_losses: bool, versions: list[str] | None, share: list[str] | None) -> list[str]:
    try:
        summary = json.loads(line)
        answered = summary["versions"]
    except (ValueError, KeyError, TypeError):
        return [f"a load.py summary, got {line!r}"]
    misses = []
    if no_losses and (summary["failed"] or summary["dropped"]):
        misses.append(f"no losses, got {summary['failed']} failed and {summary['dropped']} dropped")
    if versions is not None and sorted(answered) != sorted(versions):
        misses.append(f"answers from versions {' and '.join(sorted(versions))}, got {answered}")
    if share is not None:
        version, low, high = share[0], float(share[1]), float(share[2])
        fraction = answered.get(version, 0) / max(1, sum(answered.values()))
        if not low <= fraction <= high:
            misses.append(f"version {version} answering {low:.0%} to {high:.0%}, got {fraction:.0%}")
    return misses


if __name__ == "__main__":
    sys.exit(main())
