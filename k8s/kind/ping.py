"""Asks a URL until it answers or --seconds pass, then prints one word of verdict: "reached", or "blocked:" and
the last error. Exits 0 either way: k8s/kind-smoke.sh runs it in pods inside and outside the NetworkPolicy's
selector and judges the verdicts. It asks again after a refusal because kube-router admits a new pod's address
within seconds of the pod's start, so one refusal is not yet a verdict. The serving image's standard library only.

    python3 ping.py --url http://mnist-serve:8080/ping --seconds 20
"""

from __future__ import annotations

import argparse
import time
import urllib.request


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="what to ask, e.g. the Service's /ping")
    parser.add_argument("--seconds", type=float, required=True, help="how long to keep asking")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.seconds
    while True:
        try:
            urllib.request.urlopen(args.url, timeout=3).close()
        except OSError as error:
            if time.monotonic() > deadline:
                print("blocked:", error)
                return
            time.sleep(1)
        else:
            print("reached")
            return


if __name__ == "__main__":
    main()
