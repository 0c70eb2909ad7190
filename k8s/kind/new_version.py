"""The registry's versions that a run added: `mnist-registry list --json` before the run against after it.
k8s/kind-smoke.sh asks it what a training Job published: exactly one version (printed as one JSON object),
or, for a run that was meant to fail, none (prints nothing). Exits 1 with a line saying what it found otherwise.

    python k8s/kind/new_version.py BEFORE.json AFTER.json            the one new version
    python k8s/kind/new_version.py BEFORE.json AFTER.json --none     no new version
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def added(before: list[dict], after: list[dict]) -> list[dict]:
    known = {version["version"] for version in before}
    return [version for version in after if version["version"] not in known]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="mnist-registry list --json, before the run")
    parser.add_argument("after", type=Path, help="mnist-registry list --json, after it")
    parser.add_argument("--none", action="store_true", help="expect no new version")
    args = parser.parse_args(argv)
    new = added(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    names = ", ".join(version["version"] for version in new) or "none"
    if args.none:
        if new:
            print(f"expected no new version, found: {names}", file=sys.stderr)
            return 1
        return 0
    if len(new) != 1:
        print(f"expected one new version, found: {names}", file=sys.stderr)
        return 1
    print(json.dumps(new[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
