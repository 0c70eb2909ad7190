#!/usr/bin/env bash
# One local Apache Cassandra 5.0 node for development and tests, run from the
# jars Maven publishes: no tarball download, no Docker.
#
#   scripts/cassandra.sh up      start it (no-op if something already answers CQL)
#   scripts/cassandra.sh down    stop the node this script started
#   scripts/cassandra.sh status  exit 0 when up, 3 when not
#   scripts/cassandra.sh logs [N] log file path and its last N lines
#
# Environment: CASSANDRA_HOSTS (first entry is used, default 127.0.0.1),
# CASSANDRA_PORT (9042), CASSANDRA_HEAP (1g), CASSANDRA_JVM_OPTS,
# CASSANDRA_VERSION (default: the one in scripts/cassandra/pom.xml),
# MNIST_SERVE_CACHE (~/.cache/mnist-serve), JAVA_HOME.
# CASSANDRA_STORAGE_PORT (7000), CASSANDRA_JMX_PORT (7199). A second node (other
# ports and MNIST_SERVE_CACHE) shares the jars with CASSANDRA_LIB=<first cache>/cassandra/lib.
# CASSANDRA_CONF_EXTRA: a YAML file whose top-level settings replace or add to the
# node's cassandra.yaml (scripts/astra_local.py: TLS and logins). CASSANDRA_TLS_CA_FILE
# (and CASSANDRA_TLS_CERT_FILE, CASSANDRA_TLS_KEY_FILE): the readiness check speaks TLS.
set -o errexit -o nounset -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATES=$HERE/cassandra
CACHE=${MNIST_SERVE_CACHE:-$HOME/.cache/mnist-serve}/cassandra
LIB=${CASSANDRA_LIB:-$CACHE/lib}
CONF=$CACHE/conf
DATA=$CACHE/data
LOGS=$CACHE/logs
PIDFILE=$CACHE/cassandra.pid

HOSTS=${CASSANDRA_HOSTS:-127.0.0.1}
HOST=${HOSTS%%,*}
PORT=${CASSANDRA_PORT:-9042}
STORAGE_PORT=${CASSANDRA_STORAGE_PORT:-7000}
JMX_PORT=${CASSANDRA_JMX_PORT:-7199}
# 1g: 512m holds our blob layout (live set ~155 MB after 70k rows), but the notebook's
# list<int> layout (784 cells a row) ran a 512m node out of memory twice while reading
# 70k rows back; 256m died on our own layout. RSS is about 1.2-1.6 GiB.
HEAP=${CASSANDRA_HEAP:-1g}
START_TIMEOUT=${CASSANDRA_START_TIMEOUT:-120}
STOP_TIMEOUT=${CASSANDRA_STOP_TIMEOUT:-60}
VERSION=${CASSANDRA_VERSION:-$(sed -n 's:.*<cassandra.version>\(.*\)</cassandra.version>.*:\1:p' "$TEMPLATES/pom.xml")}
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
PYTHON=${PYTHON:-python3}

say() { echo "cassandra: $*"; }
die() { echo "cassandra: error: $*" >&2; exit 1; }

# A real CQL handshake, not just an open port: a node accepts TCP on 9042 only
# once it is fully started, but another program could sit on the port too.
# Sends a protocol v4 OPTIONS frame and expects a SUPPORTED reply.
# Exit 0 = CQL answers, 1 = nothing listening, 2 = listening but not CQL.
CQL_PROBE='
import os, socket, ssl, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
except OSError:
    sys.exit(1)
try:
    s.settimeout(3)
    if os.environ.get("CASSANDRA_TLS_CA_FILE"):
        tls = ssl.create_default_context(cafile=os.environ["CASSANDRA_TLS_CA_FILE"])
        tls.check_hostname = False
        if os.environ.get("CASSANDRA_TLS_CERT_FILE"):
            tls.load_cert_chain(os.environ["CASSANDRA_TLS_CERT_FILE"], os.environ.get("CASSANDRA_TLS_KEY_FILE"))
        s = tls.wrap_socket(s)
    s.sendall(bytes([0x04, 0, 0, 0, 0x05, 0, 0, 0, 0]))
    head = b""
    while len(head) < 9:
        chunk = s.recv(9 - len(head))
        if not chunk:
            break
        head += chunk
except OSError:
    head = b""
sys.exit(0 if len(head) == 9 and head[0] & 0x80 and head[4] == 0x06 else 2)
'
cql_probe() { "$PYTHON" -c "$CQL_PROBE" "$HOST" "$PORT"; }

# The pid of the node this script started, if it is still alive. The command
# line must name our config file, so a recycled pid or a Cassandra someone else
# runs is never taken for ours (and never killed).
our_pid() {
    local pid
    [[ -f $PIDFILE ]] || return 1
    pid=$(<"$PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    # grep without -q reads to the end: under pipefail, tr writing into a pipe grep had closed would fail the check.
    tr '\0' '\n' <"/proc/$pid/cmdline" \
        | grep -xF -- "-Dcassandra.config=file://$CONF/cassandra.yaml" >/dev/null || return 1
    echo "$pid"
}

rss_mib() { awk '/^VmRSS:/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }

log_tail() {
    echo "---- last lines of $LOGS/system.log ----" >&2
    # cut: Cassandra logs its whole configuration as one 15 kB line.
    tail -n "${1:-30}" "$LOGS/system.log" 2>/dev/null | cut -c1-300 >&2 || true
    if [[ -s $LOGS/console.log ]]; then
        echo "---- last lines of $LOGS/console.log ----" >&2
        tail -n 10 "$LOGS/console.log" | cut -c1-300 >&2
    fi
}

fetch_jars() {
    # lib/.version keys the jars by version, so a version bump refetches; the
    # fetch goes to a temp dir first so an interrupted download is never used.
    if [[ -f $LIB/.version && $(<"$LIB/.version") == "$VERSION" ]]; then
        return
    fi
    say "fetching Cassandra $VERSION jars (once)..."
    local started=$SECONDS tmp=$CACHE/lib.partial
    rm -rf "$tmp"
    mkdir -p "$LOGS"
    # Maven's output goes to a file (it prints colour codes even when quiet) and
    # is shown only when it fails.
    if ! mvn -B -Dstyle.color=never -f "$TEMPLATES/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
        -Dcassandra.version="$VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
        >"$LOGS/fetch.log" 2>&1; then
        grep -E 'ERROR|BUILD' "$LOGS/fetch.log" | head -n 20 >&2
        die "Maven could not fetch org.apache.cassandra:cassandra-all:$VERSION (log: $LOGS/fetch.log)"
    fi
    echo "$VERSION" >"$tmp/.version"
    rm -rf "$LIB"
    # CASSANDRA_LIB may be another cache's, where no node has run yet (the shared node was up from elsewhere).
    mkdir -p "$(dirname "$LIB")"
    mv "$tmp" "$LIB"
    say "fetched $(find "$LIB/" -name '*.jar' | wc -l) jars in $((SECONDS - started)) s"
}

write_conf() {
    mkdir -p "$CONF/triggers" "$DATA" "$LOGS"
    sed -e "s|@DATA_DIR@|$DATA|g" -e "s|@HOST@|$HOST|g" -e "s|@PORT@|$PORT|g" \
        -e "s|@STORAGE_PORT@|$STORAGE_PORT|g" \
        "$TEMPLATES/cassandra.yaml.in" >"$CONF/cassandra.yaml"
    if [[ -n ${CASSANDRA_CONF_EXTRA:-} ]]; then
        # Drop the template's settings that the extra file sets (each with its indented lines), then append it.
        local keys
        keys=$(grep -oE '^[a-z_]+:' "$CASSANDRA_CONF_EXTRA" | tr -d : | paste -sd '|')
        awk -v keys="^($keys):" '$0 ~ keys { skip = 1; next } skip && /^[[:space:]]/ { next } { skip = 0; print }' \
            "$CONF/cassandra.yaml" >"$CONF/cassandra.yaml.tmp"
        { echo "# From $CASSANDRA_CONF_EXTRA:"; cat "$CASSANDRA_CONF_EXTRA"; } >>"$CONF/cassandra.yaml.tmp"
        mv "$CONF/cassandra.yaml.tmp" "$CONF/cassandra.yaml"
    fi
    sed -e "s|@LOG_DIR@|$LOGS|g" "$TEMPLATES/logback.xml" >"$CONF/logback.xml"
}

check_java() {
    local spec
    command -v "$JAVA" >/dev/null || die "no java found (Cassandra 5.0 needs Java 17; set JAVA_HOME)"
    spec=$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
    # The module flags below are Cassandra's jvm17-server.options; 5.0 does not run on 21+.
    [[ $spec == 17 ]] || die "Cassandra 5.0 here needs Java 17, $JAVA is Java $spec (set JAVA_HOME)"
}

start_jvm() {
    local jamm extra
    jamm=$(find "$LIB/" -maxdepth 1 -name 'jamm-*.jar' | head -n 1)
    [[ -n $jamm ]] || die "no jamm jar in $LIB (Cassandra measures object sizes with it)"
    local opts=(
        -Xms"$HEAP" -Xmx"$HEAP" -Xss256k
        -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
        -XX:+UseThreadPriorities -XX:+PerfDisableSharedMem
        # Die rather than limp on (and risk corrupting data) after an OOM.
        -XX:+ExitOnOutOfMemoryError
        # Cassandra expects assertions on, except in Chronicle (audit/fql), which
        # runs out of memory by design with them.
        -ea -da:net.openhft...
        -javaagent:"$jamm"
        -Djdk.attach.allowAttachSelf=true
        -Djava.net.preferIPv4Stack=true
        -Dio.netty.tryReflectionSetAccessible=true
        -Dio.netty.allocator.useCacheForAllThreads=true -Dio.netty.allocator.maxOrder=11
        # From Cassandra's conf/jvm17-server.options: it reaches into JDK internals.
        --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
        --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
        --add-exports java.sql/java.sql=ALL-UNNAMED
        --add-exports java.base/java.lang.ref=ALL-UNNAMED
        --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
        --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
        --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
        --add-opens java.base/java.lang.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
        --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
        --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
        --add-opens java.base/jdk.internal.math=ALL-UNNAMED
        --add-opens java.base/jdk.internal.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
        --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
        --add-opens java.base/sun.nio.ch=ALL-UNNAMED
        --add-opens java.base/java.io=ALL-UNNAMED
        --add-opens java.base/java.lang.reflect=ALL-UNNAMED
        --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
        --add-opens java.base/java.lang=ALL-UNNAMED
        --add-opens java.base/java.util=ALL-UNNAMED
        # Foreground keeps stdout/stderr open (the daemon closes them otherwise),
        # so WARN+ and JVM crash messages land in console.log.
        -Dcassandra-foreground=yes
        -Dcassandra-pidfile="$PIDFILE"
        -Dcassandra.config=file://"$CONF/cassandra.yaml"
        -Dcassandra.storagedir="$DATA"
        -Dcassandra.logdir="$LOGS"
        -Dcassandra.triggers_dir="$CONF/triggers"
        -Dlogback.configurationFile="$CONF/logback.xml"
        # Local-only JMX so nodetool (org.apache.cassandra.tools.NodeTool) works.
        -Dcassandra.jmx.local.port="$JMX_PORT"
        # A single node has no peers to wait for or to tell it is leaving.
        -Dcassandra.skip_wait_for_gossip_to_settle=0
        -Dcassandra.shutdown_announce_in_ms=0
    )
    # Extra JVM flags for one-off diagnosis, e.g. -XX:NativeMemoryTracking=summary.
    read -r -a extra <<<"${CASSANDRA_JVM_OPTS:-}"
    opts+=("${extra[@]}")
    # setsid + nohup: the node outlives this script and the terminal, and a
    # Ctrl-C in the caller's shell does not reach it.
    # Heap dumps and hs_err files are written to the working directory.
    cd "$CACHE"
    setsid nohup "$JAVA" "${opts[@]}" -cp "$CONF:$LIB/*" \
        org.apache.cassandra.service.CassandraDaemon \
        >"$LOGS/console.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
}

wait_for_cql() {
    local pid=$1 started=$2
    local deadline=$((started + START_TIMEOUT))
    until cql_probe; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log_tail 40
            die "the node exited during startup; see $LOGS/system.log"
        fi
        if ((SECONDS >= deadline)); then
            log_tail 40
            die "no CQL on $HOST:$PORT after ${START_TIMEOUT} s; node (pid $pid) left running, log: $LOGS/system.log (stop it with: $0 down)"
        fi
        sleep 1
    done
    say "up on $HOST:$PORT in $((SECONDS - started)) s (pid $pid, RSS $(rss_mib "$pid") MiB)"
}

cmd_up() {
    local pid rc=0
    cql_probe || rc=$?
    if ((rc == 0)); then
        if pid=$(our_pid); then
            say "already up on $HOST:$PORT (pid $pid)"
        else
            say "something already answers CQL on $HOST:$PORT; using it, starting nothing"
        fi
        return
    fi
    ((rc == 1)) || die "$HOST:$PORT is taken by something that does not speak CQL"
    if pid=$(our_pid); then
        say "already starting (pid $pid), waiting for CQL on $HOST:$PORT..."
        wait_for_cql "$pid" "$SECONDS"
        return
    fi
    check_java
    fetch_jars
    write_conf
    say "starting Cassandra $VERSION (heap $HEAP), data in $DATA..."
    local started=$SECONDS
    start_jvm
    wait_for_cql "$(<"$PIDFILE")" "$started"
}

cmd_down() {
    local pid
    if ! pid=$(our_pid); then
        rm -f "$PIDFILE"
        if cql_probe; then
            say "not started by this script; leaving the Cassandra on $HOST:$PORT alone"
        else
            say "not running"
        fi
        return
    fi
    say "stopping pid $pid..."
    # SIGTERM runs Cassandra's shutdown hook, which flushes memtables, so the
    # next start has no commit log to replay.
    kill -TERM "$pid" 2>/dev/null || true
    local started=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS - started >= STOP_TIMEOUT)); then
            say "still running after ${STOP_TIMEOUT} s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 1
    done
    rm -f "$PIDFILE"
    say "stopped in $((SECONDS - started)) s"
}

cmd_status() {
    local pid
    if pid=$(our_pid); then
        if cql_probe; then
            say "running: pid $pid, $HOST:$PORT, RSS $(rss_mib "$pid") MiB"
            return 0
        fi
        say "starting: pid $pid, no CQL on $HOST:$PORT yet"
        return 3
    fi
    if cql_probe; then
        say "running (not started by this script) on $HOST:$PORT"
        return 0
    fi
    say "not running"
    return 3
}

cmd_logs() {
    echo "$LOGS/system.log"
    tail -n "${1:-50}" "$LOGS/system.log" 2>/dev/null || say "no log yet"
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
logs) cmd_logs "${2:-50}" ;;
*)
    echo "usage: $0 up|down|status|logs" >&2
    exit 2
    ;;
esac
