"""The database side of `python -m training`: load-data, bench-db, predict-table and train's database flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from registry import db
from registry.settings import SETTINGS_HELP, cassandra_settings, keyspace_name
from training.cassandra_source import LAYOUTS, CassandraMnist
from training.checkpoint_store import PREFIX, CheckpointStore, new_run_id, parse_reference
from training.data import DownloadedMnist, IdxDirectory
from training.train import TrainConfig, TrainState


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not the "(default: None)" or "(default: False)" of optional flags and switches, and
    not a second time where the help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_layout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="blob",
        help="blob: our tables (train_images, test_images, predict_images); notebook: the astra-pytorch "
        "notebook's raw_train, raw_test, raw_predict",
    )


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def database_command(commands: argparse._SubParsersAction, name: str, summary: str, description: str):
    """A subcommand that talks to the database: its --help ends with the connection settings it reads."""
    return commands.add_parser(
        name, help=summary, description=description, formatter_class=HelpFormatter, epilog=SETTINGS_HELP
    )


def add_commands(commands: argparse._SubParsersAction, positive_int) -> None:
    load_data = database_command(
        commands,
        "load-data",
        "load MNIST into the database tables (idempotent), then check the counts",
        "Write the 60,000 training and 10,000 test images into the tables of a layout with concurrent "
        "prepared statements, then read the ids back to check every row arrived. Running it again rewrites the same "
        "rows.",
    )
    add_layout(load_data)
    load_data.add_argument("--limit", type=positive_int, help="only the first N images of each split (quick trials)")
    load_data.add_argument(
        "--predict",
        type=non_negative_int,
        default=0,
        help="also put the first N test images (with labels) into the predict table",
    )
    load_data.add_argument(
        "--data-dir", type=Path, help="your own MNIST IDX files (default: MNIST fetched once into the cache)"
    )
    load_data.set_defaults(run=run_load_data)

    bench = database_command(
        commands,
        "bench-db",
        "load and read speed of both layouts side by side, with the targets",
        "Load MNIST into both layouts and read it back as training does; prints rows/s and seconds "
        "beside the targets (load >= 10,000 rows/s, read <= 10 s). Uses its own keyspace, so the data of "
        "CASSANDRA_KEYSPACE is never touched.",
    )
    bench.add_argument(
        "--keyspace", default="mnist_bench", help="keyspace to load (created on a local node; on Astra it must exist)"
    )
    bench.add_argument("--limit", type=positive_int, help="only the first N images of each split")
    bench.set_defaults(run=run_bench_db)

    predict = database_command(
        commands,
        "predict-table",
        "score the predict table's rows with a registered model, write the predictions",
        "Download a model version from the registry, run its TorchScript model.pt on every row of the "
        "predict table (predict_images, or raw_predict with --layout notebook) and write digit, confidence "
        "and model version of each into the predictions table.",
    )
    predict.add_argument(
        "--version", default="production", metavar="VERSION|ALIAS", help="the registry's version to score with"
    )
    add_layout(predict)
    predict.add_argument("--batch-size", type=positive_int, default=1000, help="images per forward pass")
    predict.set_defaults(run=run_predict_table)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        choices=("files", "cassandra"),
        default="files",
        help="files: MNIST IDX files; cassandra: the tables of --layout",
    )
    add_layout(parser)
    parser.add_argument(
        "--any-count",
        action="store_true",
        help="with --source cassandra: accept tables that do not hold MNIST's 60,000/10,000 images",
    )
    parser.add_argument(
        "--checkpoints",
        choices=("files", "cassandra"),
        default="files",
        help="files: OUT/checkpoint.pt after each epoch; cassandra: also the checkpoints table",
    )


def open_database(settings=None):
    return db.connect(settings or cassandra_settings())


# --- train ------------------------------------------------------------------------------------


def train_database(args: argparse.Namespace, main: bool = True):
    """A session when a train flag needs the database, else a context yielding None. Of several ranks, only
    rank 0 (main) resumes and saves checkpoints; every rank reads its share of the data."""
    needed = args.source == "cassandra" or (
        main and (args.checkpoints == "cassandra" or str(args.resume or "").startswith(PREFIX))
    )
    return open_database() if needed else nullcontext()


def train_source(args: argparse.Namespace, session):
    if args.source == "files":
        return IdxDirectory(args.data_dir) if args.data_dir else DownloadedMnist()
    if args.data_dir:
        raise ValueError("--data-dir reads files; it does not go with --source cassandra")
    return CassandraMnist(
        session, LAYOUTS[args.layout], cassandra_settings().where(), expect_mnist_counts=not args.any_count
    )


def train_resume(args: argparse.Namespace, session, config: TrainConfig) -> dict | None:
    from training import job

    if not args.resume:
        return None
    if not args.resume.startswith(PREFIX):
        return job.load_checkpoint(Path(args.resume), config)
    run_id, epoch = parse_reference(args.resume)
    return job.check_resumable(CheckpointStore(session).load(run_id, epoch), config, args.resume)


def train_checkpoints(args: argparse.Namespace, session, config: TrainConfig) -> Callable[[TrainState], None] | None:
    """on_epoch for job.run that saves to the checkpoints table; a resumed run keeps its run id."""
    if args.checkpoints != "cassandra":
        return None
    resumed = str(args.resume or "")
    run_id = parse_reference(resumed)[0] if resumed.startswith(PREFIX) else new_run_id()
    print(
        f"checkpoints: each epoch goes to the database as run {run_id} (resume with --resume {PREFIX}{run_id})",
        file=sys.stderr,
    )
    store = CheckpointStore(session)
    return lambda state: store.save(run_id, state, config)


# --- load-data, bench-db, predict-table ---------------------------------------------------------


def mnist_for(args: argparse.Namespace):
    source = IdxDirectory(args.data_dir) if getattr(args, "data_dir", None) else DownloadedMnist()
    return source.load().check_counts()


def run_load_data(args: argparse.Namespace) -> None:
    from training.load_data import load

    mnist = mnist_for(args)
    settings = cassandra_settings()
    with open_database(settings) as session:
        report = load(session, LAYOUTS[args.layout], mnist, args.limit, args.predict)
    tables = ", ".join(f"{t.table} {t.rows:,}" for t in report.tables)
    print(
        f"loaded {report.rows:,} rows ({tables}) into {settings.where()} in {report.seconds:.1f} s: "
        f"{report.rows_per_second:,.0f} rows/s; count check passed: every row is in its table"
    )
    for t in report.tables:
        if t.others:
            print(f"note: {t.table} also holds {t.others:,} rows with other ids (from an earlier, bigger load)")


def run_bench_db(args: argparse.Namespace) -> None:
    from training import bench_db

    mnist = mnist_for(args)
    settings = replace(cassandra_settings(), keyspace=keyspace_name(args.keyspace, "--keyspace "))
    with open_database(settings) as session:
        figures = bench_db.measure(session, mnist, settings.where(), args.limit)
    print(f"bench-db: {settings.where()}")
    print(bench_db.table(figures))


def run_predict_table(args: argparse.Namespace) -> None:
    from training.predict_table import predict_table

    with open_database() as session:
        report = predict_table(session, LAYOUTS[args.layout], args.version, args.batch_size)
    accuracy = (
        f"; accuracy {report.accuracy:.2%} on the {report.labelled:,} labelled rows"
        if report.accuracy is not None
        else ""
    )
    print(
        f"scored {report.rows:,} rows of {report.table} with model version {report.version}{accuracy}; "
        f"wrote them to predictions in {report.seconds:.1f} s"
    )
