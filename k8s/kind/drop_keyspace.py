"""Drops a keyspace of the Cassandra node the CASSANDRA_* settings name (the registry's settings; see
mnist-registry --help), if it exists. k8s/kind-smoke.sh gives its registry a keyspace of its own and drops it
first, so that each run publishes versions 1, 2 and 3 anew and the pods find exactly those.

    python k8s/kind/drop_keyspace.py mnist_kind_smoke
"""

from __future__ import annotations

import argparse
import re


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("keyspace", help="the keyspace to drop (letters, digits and _)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\w+", args.keyspace):
        parser.error(f"not a keyspace name: {args.keyspace!r}")

    from cassandra.cluster import Cluster

    from registry.db import cluster_kwargs
    from registry.settings import cassandra_settings

    cluster = Cluster(**cluster_kwargs(cassandra_settings()))
    try:
        cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {args.keyspace}")
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
