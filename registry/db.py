"""One way into Cassandra or Astra DB: the session, the schema, token-range reads and windowed writes."""

from __future__ import annotations

import itertools
import logging
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from cassandra import DriverException, Unauthorized
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.connection import ConnectionException
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.protocol import ErrorMessage
from cassandra.query import tuple_factory

from registry.settings import CassandraSettings

SCHEMA = Path(__file__).with_name("schema.cql")
# Murmur3Partitioner tokens are signed 64-bit; no key ever hashes to the minimum, so the ranges
# (MIN, t1], (t1, t2], ..., (tn, MAX] cover every row exactly once.
MIN_TOKEN = -(2**63)
MAX_TOKEN = 2**63 - 1
READ_WINDOW = 32  # token-range queries in flight: enough for any local node, gentle on Astra's rate limits
DRIVER_ERRORS = (DriverException, NoHostAvailable, ConnectionException, ErrorMessage)

# Failures reach the user once, as DatabaseError at the command line; without this the driver's
# own warnings about each host it tried would print to stderr as well.
logging.getLogger("cassandra").addHandler(logging.NullHandler())


T = TypeVar("T")


class DatabaseError(RuntimeError):
    """Cassandra is unreachable or refused a request; the message says where and what to do."""


def cluster_kwargs(settings: CassandraSettings) -> dict:
    """Arguments for cassandra.cluster.Cluster: the same code path for a local node, a node with TLS and a
    login, and Astra."""
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
        request_timeout=settings.request_timeout,
        row_factory=tuple_factory,  # rows are unpacked by position; named tuples cost time on 70,000 rows
    )
    common = {
        "execution_profiles": {EXEC_PROFILE_DEFAULT: profile},
        "connect_timeout": settings.connect_timeout,
        "control_connection_timeout": settings.connect_timeout,
    }
    if settings.astra:
        cloud = {
            "secure_connect_bundle": str(settings.secure_bundle),
            # The driver unpacks the bundle into a folder beside it unless told to use the temp directory;
            # beside it is a read-only Secret mount in a pod.
            "use_default_tempdir": True,
            "connect_timeout": settings.connect_timeout,  # the metadata service's request
        }
        return {"cloud": cloud, "auth_provider": PlainTextAuthProvider("token", settings.token), **common}
    kwargs = {"contact_points": list(settings.hosts), "port": settings.port, **common}
    if settings.username:
        kwargs["auth_provider"] = PlainTextAuthProvider(settings.username, settings.password)
    if settings.tls_ca:
        kwargs["ssl_context"] = tls_context(settings)
    return kwargs


def tls_context(settings: CassandraSettings) -> ssl.SSLContext:
    """TLS to the nodes: their certificates must chain to CASSANDRA_TLS_CA_FILE (and name the address connected
    to, unless CASSANDRA_TLS_VERIFY_HOSTNAME=false); the client certificate when the nodes require one."""
    try:
        context = ssl.create_default_context(cafile=str(settings.tls_ca))
        context.check_hostname = settings.tls_verify_hostname
        if settings.tls_cert:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    except ssl.SSLError as error:
        raise DatabaseError(f"the TLS files of CASSANDRA_TLS_*_FILE cannot be used: {describe(error)}") from None
    return context


def schema_statements(text: str) -> list[str]:
    """The statements of a CQL file: `--` comments dropped, split at semicolons."""
    lines = [line.split("--", 1)[0] for line in text.splitlines()]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


def use_keyspace(session: Session, settings: CassandraSettings, remedy: str) -> None:
    """Use the settings' keyspace, which must exist; `remedy` says what to do when it does not."""
    if settings.keyspace not in session.cluster.metadata.keyspaces:
        raise DatabaseError(f"keyspace {settings.keyspace} does not exist at {settings.where()}; {remedy}")
    session.set_keyspace(settings.keyspace)


def apply_schema(session: Session, settings: CassandraSettings) -> None:
    """Create the keyspace (on a node of our own; Astra's is made in its console) and the tables of schema.cql
    that it lacks. Nothing is sent for what exists, so a role that may write rows but not change the schema
    can still load data and publish."""
    if settings.keyspace not in session.cluster.metadata.keyspaces and not settings.astra:
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {settings.keyspace} "
            "WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
    # Astra refuses CREATE KEYSPACE over CQL.
    use_keyspace(
        session, settings, "create it in the Astra console (Add Keyspace) or set CASSANDRA_KEYSPACE to an existing one"
    )
    tables = session.cluster.metadata.keyspaces[settings.keyspace].tables
    for statement in schema_statements(SCHEMA.read_text()):
        if table_name(statement) not in tables:
            session.execute(statement)


def table_name(statement: str) -> str:
    """The table a `CREATE TABLE IF NOT EXISTS name (...)` statement makes."""
    return re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", statement, re.IGNORECASE).group(1)


def describe(error: BaseException) -> str:
    """One line for a driver error (NoHostAvailable carries a dict of per-host errors)."""
    if isinstance(error, NoHostAvailable):  # its str() is a tuple's, with an empty dict when no host was tried
        reasons = "; ".join(f"{host}: {reason}" for host, reason in error.errors.items())
        first = error.args[0] if error.args else "no host available"
        return f"{first} ({reasons})" if reasons else first
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, Unauthorized):  # the server's own sentence names the role, the permission and the table
        said = re.search(r'message="(.*)"', text)
        return f"not permitted: {said.group(1) if said else text}"
    # The driver raises its own message for a metadata service it cannot reach (Astra); the reason is the
    # exception it replaced (refused, timed out, a certificate refused).
    if isinstance(error, DriverException) and error.__context__ is not None and "metadata service" in text:
        return f"{text.rstrip()} ({describe(error.__context__)})"
    return text


@contextmanager
def connect(settings: CassandraSettings, create_schema: bool = True) -> Iterator[Session]:
    """A session on the settings' keyspace; driver errors become DatabaseError. With create_schema the keyspace
    (local node) and any missing table are created first. Serving reads without it, so its credentials (an
    Astra token with a read-only role) need no permission to change the schema."""
    try:
        # With a bundle, the driver reads it and asks Astra's metadata service for the nodes right here.
        cluster = Cluster(**cluster_kwargs(settings))
    except (*DRIVER_ERRORS, ValueError, OSError) as error:
        raise DatabaseError(f"cannot connect to Cassandra at {settings.where()}: {describe(error)}") from None
    try:
        try:
            session = cluster.connect()
        except (*DRIVER_ERRORS, OSError) as error:  # OSError: a TLS handshake the node broke off
            reason = describe(error)
            refused = not settings.astra and "refused" in reason.lower()
            hint = (
                " (start a local node with scripts/cassandra.sh up, or set CASSANDRA_HOSTS and CASSANDRA_PORT)"
                if refused
                else ""
            )
            raise DatabaseError(f"cannot connect to Cassandra at {settings.where()}: {reason}{hint}") from None
        try:
            if create_schema:
                apply_schema(session, settings)
            else:
                use_keyspace(
                    session,
                    settings,
                    "set CASSANDRA_KEYSPACE to the registry's keyspace, or publish a model into this one",
                )
            yield session
        except DRIVER_ERRORS as error:
            raise DatabaseError(f"Cassandra at {settings.where()}: {describe(error)}") from None
    finally:
        cluster.shutdown()


def retrying(attempt: Callable[[], T], seconds: float, report: Callable[[str], None]) -> T:
    """attempt() again while it fails with DatabaseError (a node down or restarting), for up to `seconds`,
    waiting 1, 2, 4, then 8 s between attempts; then the last error, saying how long it was tried.
    Only for work that is safe to repeat: reads, and writes that go through a temporary file."""
    deadline = time.monotonic() + seconds
    for number in itertools.count(1):
        try:
            return attempt()
        except DatabaseError as error:
            left = deadline - time.monotonic()
            if left <= 0:
                if number == 1:
                    raise
                raise DatabaseError(f"{error} (gave up after {number} attempts in {seconds:g} s)") from None
            wait = min(2.0 ** min(number - 1, 3), left)
            reason = f": {error}" if number == 1 else ""  # the same reason each time: said once
            report(f"attempt {number} failed{reason}; trying again in {wait:.0f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def token_ranges(count: int, span: tuple[int, int] = (MIN_TOKEN, MAX_TOKEN)) -> list[tuple[int, int]]:
    """Split the Murmur3 token ring (or its (start, end] part `span`) into `count` contiguous (start, end] ranges
    of near-equal width."""
    if count < 1:
        raise ValueError(f"need at least one token range, got {count}")
    start, end = span
    width = (end - start) // count
    bounds = [start + i * width for i in range(count)] + [end]
    return list(itertools.pairwise(bounds))


def default_range_count() -> int:
    """Four ranges per core keeps every core of a local node busy while the client decodes."""
    return 4 * (os.cpu_count() or 1)


def read_token_ranges(
    session: Session,
    table: str,
    partition_key: str,
    columns: Sequence[str],
    page_rows: int,
    ranges: int | None = None,
    on_rows: Callable[[int], None] = lambda count: None,
    span: tuple[int, int] = (MIN_TOKEN, MAX_TOKEN),
) -> list[tuple]:
    """Every row of `table` (selected columns) whose partition's token lies in `span` (by default the whole
    ring), read as parallel token-range queries, in no order.

    `page_rows` bounds what the node assembles per request: a node builds each page on its heap,
    whatever columns are selected, so wide rows need small pages.
    """
    select = session.prepare(
        f"SELECT {', '.join(columns)} FROM {table} WHERE token({partition_key}) > ? AND token({partition_key}) <= ?"
    )
    select.fetch_size = page_rows
    rows: list[tuple] = []
    queries = ((select, bounds, 1) for bounds in token_ranges(ranges or default_range_count(), span))
    for result, _ in windowed(session, queries, READ_WINDOW):
        while True:  # a range larger than a page: fetch the rest while the other ranges run
            page = result.current_rows
            rows.extend(page)
            on_rows(len(page))
            if not result.has_more_pages:
                break
            result.fetch_next_page()
    return rows


def windowed(session: Session, statements: Iterable[tuple], window: int) -> Iterator[tuple]:
    """Execute (statement, parameters, weight) triples asynchronously, at most `window` in flight;
    yields (result, weight) in order and raises the first failure.

    The statements are drawn lazily, so a generator reading a large file keeps only the window in memory.
    """
    in_flight: deque = deque()
    for statement, parameters, weight in statements:
        in_flight.append((session.execute_async(statement, parameters), weight))
        if len(in_flight) >= window:
            future, oldest = in_flight.popleft()
            yield future.result(), oldest
    while in_flight:
        future, oldest = in_flight.popleft()
        yield future.result(), oldest


def execute_windowed(
    session: Session,
    statements: Iterable[tuple],
    window: int,
    on_done: Callable[[int], None] = lambda weight: None,
) -> int:
    """Run writes through `windowed`; `on_done(weight)` after each (progress bars count rows or
    bytes, not requests). Returns the total weight."""
    total = 0
    for _, weight in windowed(session, statements, window):
        total += weight
        on_done(weight)
    return total
