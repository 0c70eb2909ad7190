"""Which training images each rank reads under torchrun, and the checks the ranks make together on what they
read. From IDX files a rank keeps every world-th image; from Cassandra it reads only the partitions whose tokens
fall in its own part of the token ring, so no rank reads the whole training table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from registry import db
from training import distributed
from training.cassandra_source import CassandraMnist, Images, read_images
from training.data import TRAIN_COUNT, DataError, MnistSource, Share, row_digests, rows_fingerprint, share_of


def load_share(source: MnistSource, rank: int, world: int) -> Share:
    """This rank's share of the data; every rank calls it at the same point, and all fail if one does."""
    if isinstance(source, CassandraMnist):
        return cassandra_share(source, rank, world)
    # Rank 0 first: the first use of the cache downloads MNIST, and ranks on one machine must not do it side by side.
    first = distributed.all_or_none(source.load if rank == 0 else lambda: None)
    mnist = distributed.all_or_none(lambda: first if rank == 0 else source.load())
    share = share_of(mnist, distributed.shard(len(mnist.train_images), rank, world), with_test=rank == 0)
    # Every rank holds the files whole, so rank 0 can name them exactly as a one-process run does.
    return replace(share, fingerprint=mnist.fingerprint() if rank == 0 else None)


def token_share(rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s (start, end] part of the Murmur3 token ring: the ranks' parts are disjoint and cover it."""
    return db.token_ranges(world)[rank]


def cassandra_share(source: CassandraMnist, rank: int, world: int) -> Share:
    def read() -> tuple[Images, Images | None]:
        with source.progress() as bar:
            train = read_images(source.session, source.layout, "train", source.ranges, bar, token_share(rank, world))
            # Only rank 0 scores the test set, and 10,000 rows are quick to read whole.
            test = source.read_checked("test", bar) if rank == 0 else None
        return train, test

    train, test = distributed.all_or_none(read)
    table = train.table
    counts = distributed.all_gather(len(train.ids))
    total = sum(counts)
    unlabelled = int(distributed.all_reduce_sums([float((train.labels < 0).sum())])[0])
    source.check(table, total, unlabelled, TRAIN_COUNT)
    empty = [number for number, count in enumerate(counts) if count == 0]
    if empty:
        raise DataError(
            f"{world} ranks share {table}'s partitions, and rank {empty[0]}'s part of the token ring holds none: "
            f"more ranks than partitions to share out ({source.layout.name} layout); start fewer ranks"
        )
    check_ids_together(train, total, source.how_to_load)
    digests = distributed.gather_to_main((train.ids, row_digests(train.images, train.labels)))
    fingerprint = None
    if digests is not None:
        ids = np.concatenate([part_ids for part_ids, _ in digests])
        rows = b"".join(part for _, part in digests)
        in_id_order = b"".join(rows[32 * i : 32 * i + 32] for i in np.argsort(ids, kind="stable"))
        fingerprint = rows_fingerprint(in_id_order, row_digests(test.images, test.labels))
    no_test = np.zeros((0, 28, 28), np.uint8)
    return Share(
        train.images,
        train.labels.astype(np.uint8),
        train.ids,
        total,
        test.images if test is not None else no_test,
        test.labels.astype(np.uint8) if test is not None else np.zeros(0, np.uint8),
        source.origin,
        fingerprint,
    )


def check_ids_together(train: Images, total: int, how_to_load: str) -> None:
    """The ranks' ids together must be 0..total-1, each once: a gap is a row lost or a load that stopped halfway,
    a repeat a row two ranks read (the same raise on every rank, as each sees the same sums)."""
    seen = np.zeros(total, np.int64)
    np.add.at(seen, train.ids[(train.ids >= 0) & (train.ids < total)], 1)
    seen = distributed.all_reduce_array(seen)
    if not (seen == 1).all():
        first = int(np.argmax(seen != 1))
        raise DataError(
            f"{train.table}: the {total:,} rows do not have the ids 0..{total - 1:,} "
            f"(id {first:,} is missing or repeated); load the table again with: {how_to_load}"
        )
