"""Command line of the training job: `python -m training COMMAND --help`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from registry.db import DatabaseError
from registry.store import RegistryError
from training import cassandra_cli
from training.data import DataError
from training.distributed import DEFAULT_TIMEOUT_S, DistributedError
from training.export import ExportError
from training.train import TrainConfig, pick_device

DEFAULTS = TrainConfig()


def positive(kind: type, words: str):
    """An argparse type that names what it wants instead of 'invalid int value'."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}")
        return value

    return parse


positive_int = positive(int, "a positive whole number")
positive_float = positive(float, "a positive number")


def add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train the CNN, export and verify TorchScript, write metrics and plots",
        description="Train the MNIST CNN, export it to TorchScript (verified against the eager model on the "
        "whole test set) and write model.pt, metrics.json, training-curve.png and confusion-matrix.png.",
        formatter_class=cassandra_cli.HelpFormatter,
    )
    parser.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs, help="passes over the training images")
    parser.add_argument(
        "--batch-size", type=positive_int, default=DEFAULTS.batch_size, help="images per optimiser step"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=DEFAULTS.lr, help="peak learning rate of the one-cycle schedule"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULTS.seed, help="same seed, data and device give the same model"
    )
    parser.add_argument(
        "--device", default=DEFAULTS.device, help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("artifacts"), help="where model.pt, metrics.json and the plots go"
    )
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue from a checkpoint.pt (model and optimiser state), "
        "or from the database: cassandra:RUN_ID[@EPOCH]",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="your own MNIST IDX files (default: MNIST fetched once into the cache)"
    )
    parser.add_argument(
        "--val-size",
        type=int,
        default=DEFAULTS.val_size,
        help="training images held out for the per-epoch validation line",
    )
    parser.add_argument("--train-limit", type=positive_int, help="train on the first N images only (quick trials)")
    parser.add_argument("--no-augment", action="store_true", help="no random rotations, scalings and shifts")
    parser.add_argument(
        "--rank-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others (to join, and at each step) before it stops "
        "with an error naming what it waited for",
    )
    cassandra_cli.add_train_options(parser)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    from training import distributed, job  # torch imports are slow; --help should not wait for them

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        val_size=args.val_size,
        train_limit=args.train_limit,
        augment=not args.no_augment,
    )
    # Under torchrun (several ranks) the ranks join first; rank 0 alone reads the checkpoint to resume from and
    # writes checkpoints, and the others take what it read.
    with distributed.process_group(pick_device(config.device), args.rank_timeout):
        main, me = distributed.is_main(), distributed.name()
        with cassandra_cli.train_database(args, main) as session:  # None unless a flag needs the database
            source = cassandra_cli.train_source(args, session)
            resume = distributed.from_main(lambda: cassandra_cli.train_resume(args, session, config))
            on_epoch = cassandra_cli.train_checkpoints(args, session, config) if main else None
            metrics = job.run(source, config, args.out, resume, on_epoch=on_epoch)
    if metrics is None:
        distributed.log(f"{me}: done; rank 0 writes the outputs")
        return
    print(
        f"test accuracy {metrics['test_accuracy']:.2%} (loss {metrics['test_loss']:.4f}) after {metrics['epochs']} "
        f"epochs "
        f"in {metrics['train_seconds']:.0f} s; wrote {args.out}/model.pt, metrics.json, training-curve.png, "
        f"confusion-matrix.png"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(commands)
    cassandra_cli.add_commands(commands, positive_int)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (DataError, ExportError, ValueError, DatabaseError, RegistryError, DistributedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; the last finished epoch is in checkpoint.pt (use --resume)" if args.command == "train" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    return 0
