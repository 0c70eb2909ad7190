"""Training as one of several ranks under torchrun: the process group, who this rank is, and the few collectives
the job needs. Without torchrun's variables (or with WORLD_SIZE=1) every function here is a no-op for one process."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 300  # a rank waiting longer than this for the others (to join, or at a step) gives up


class DistributedError(RuntimeError):
    """A rank could not reach the others, lost them, or learnt that another rank failed; the message names which."""


@dataclass(frozen=True)
class Place:
    """Where this process stands, as torchrun (or a Kubernetes operator) says in the environment."""

    rank: int
    world: int
    local_rank: int
    address: str  # rank 0's rendezvous, host:port

    def name(self) -> str:
        return f"rank {self.rank} of {self.world}"


def from_environment(environ: Mapping[str, str] = os.environ) -> Place | None:
    """This process's place from WORLD_SIZE, RANK and LOCAL_RANK; None when started without torchrun."""
    if "WORLD_SIZE" not in environ:
        return None

    def number(name: str, default: str | None = None) -> int:
        text = environ.get(name, default)
        if text is None:
            raise DistributedError(f"WORLD_SIZE is set but {name} is not; start the job with torchrun, which sets both")
        try:
            return int(text)
        except ValueError:
            raise DistributedError(f"{name}={text!r} is not a whole number; start the job with torchrun") from None

    world, rank, local_rank = number("WORLD_SIZE"), number("RANK", "0"), number("LOCAL_RANK", "0")
    if world < 1:
        raise DistributedError(
            f"WORLD_SIZE={world}: training needs at least 1 rank (torchrun --nnodes and --nproc-per-node of 1 or more)"
        )
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside 0..{world - 1} for WORLD_SIZE={world}")
    address = f"{environ.get('MASTER_ADDR', '127.0.0.1')}:{environ.get('MASTER_PORT', '29500')}"
    return Place(rank, world, local_rank, address)


def backend(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """Each rank on a node takes its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
    if device.type != "cuda" or size() == 1:
        return device
    return torch.device("cuda", local_rank())


@contextmanager
def process_group(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Place | None]:
    """Join the other ranks for the duration of the block (nothing to join for one process). Failures of the
    group inside the block come out as DistributedError naming this rank."""
    place = from_environment()
    if place is None or place.world == 1:
        yield place
        return
    if device.type == "cuda":
        if place.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"{place.name()}: LOCAL_RANK {place.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "start at most one rank per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(place.local_rank)
    try:
        dist.init_process_group(backend(device), timeout=timedelta(seconds=timeout_s))
    except Exception as error:  # the store and the backends raise several kinds for one cause: nobody answered
        waited = "the other ranks to join" if place.rank == 0 else "rank 0"
        raise DistributedError(
            f"{place.name()}: gave up waiting for {waited} at {place.address} (--rank-timeout {timeout_s:g} s: "
            f"{first_line(error)}); check that every rank is running and that rank 0's address is reachable"
        ) from None
    log(f"{place.name()} (pid {os.getpid()}): joined through {backend(device)} at {place.address}")
    try:
        yield place
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        raise DistributedError(
            f"{place.name()}: lost the other ranks ({first_line(error)}); another rank stopped or is unreachable "
            "(its own log says why); nothing was written"
        ) from None
    finally:
        dist.destroy_process_group()


def lost_contact(error: RuntimeError) -> bool:
    """An error of the process group itself: gloo raises plain RuntimeErrors naming its transport."""
    return isinstance(error, dist.DistError) or any(word in str(error) for word in ("gloo", "NCCL", "c10d"))


def log(line: str) -> None:
    """One line to stderr in one write: the ranks share torchrun's stderr, and print() writes the line and its
    newline apart, so two ranks' lines would run into each other."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 alone writes: checkpoints, the exported model, metrics and plots, and shows the progress bar."""
    return rank() == 0


def name() -> str:
    return f"rank {rank()} of {size()}"


# --- which images a rank takes -------------------------------------------------------------------


def shard(count: int, rank: int, world: int) -> np.ndarray:
    """The ids of rank `rank`'s images out of `count`: every world-th one, starting at its rank. The ranks'
    shards are disjoint, cover 0..count-1, and differ in size by at most one image."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world}: need 0 <= rank < world and world >= 1")
    return np.arange(rank, count, world)


# --- collectives (each is a plain local computation for one process) -------------------------------------


def collective_device() -> torch.device:
    """Where a tensor must be for a collective: NCCL moves only GPU tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(values: list[float]) -> list[float]:
    """The sums over all ranks of these numbers (counts, loss sums), in float64."""
    if size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_array(array: np.ndarray) -> np.ndarray:
    """Element-wise sums over all ranks of an int64 array (e.g. how often each id was read)."""
    if size() == 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def all_gather(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order."""
    if size() == 1:
        return [value]
    gathered: list = [None] * size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's `value` on rank 0, in rank order; None on the others."""
    if size() == 1:
        return [value]
    gathered: list | None = [None] * size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def all_or_none(work: Callable[[], T]) -> T:
    """`work()` on every rank; when it fails on any rank, it fails on all: the failed rank raises its own error,
    the others an error that names that rank. Without this a rank that stops early leaves the others waiting
    for it at their next collective until the timeout."""
    try:
        value, failure = work(), None
    except (ValueError, RuntimeError, OSError) as error:  # DataError, DatabaseError and friends among them
        value, failure = None, error
    if size() == 1:
        if failure is not None:
            raise failure
        return value
    reasons = all_gather(None if failure is None else first_line(failure))
    if failure is not None:
        raise failure
    failed = [(number, reason) for number, reason in enumerate(reasons) if reason is not None]
    if failed:
        number, reason = failed[0]
        raise DistributedError(f"{name()}: stopping because rank {number} failed: {reason}")
    return value


def from_main(work: Callable[[], T]) -> T:
    """`work()` run on rank 0 alone, its result (or its error) handed to every rank: e.g. the checkpoint to
    resume from, which only rank 0 may be able to read."""
    if size() == 1:
        return work()
    message: list = [None]
    if is_main():
        try:
            message[0] = ("value", work())
        except (ValueError, RuntimeError, OSError) as error:
            message[0] = ("error", first_line(error))
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    kind, payload = message[0]
    if kind == "error":
        raise DistributedError(f"{name()}: stopping because rank 0 failed: {payload}")
    return payload


# --- the model ------------------------------------------------------------------------------------------


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as the training steps use it: under DDP (gradients averaged over the ranks at every step) when
    there are several ranks, else itself. Checkpoints and the export always take the unwrapped model, so no
    'module.' prefix reaches them."""
    if size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def share_buffers(model: nn.Module) -> None:
    """Rank 0's batch-norm statistics to every rank, so every rank scores the model rank 0 will save."""
    if size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
