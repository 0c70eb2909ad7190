#!/usr/bin/env python3
"""Serve the draw-a-digit page (ui/) on this machine and print its address: `make ui`, beside `make serve`.

Only the page's files are served; the page itself calls TorchServe, which must allow the page's origin
(`make serve` does: handler/server.py --allow-origin http://127.0.0.1:8088).
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGE_DIR = Path(__file__).resolve().parent.parent / "ui"
HOST = "127.0.0.1"  # the page is for the person at this machine; its origin must match the server's setting
PORT = 8088
DEFAULT_API = "http://127.0.0.1:8080/predictions/mnist"  # ui/app.js's default, `make serve`'s address


class PageFiles(SimpleHTTPRequestHandler):
    """The files of ui/, never cached (an edited page shows on reload), with one log line per request."""

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class QuietPageFiles(PageFiles):
    def log_message(self, *args) -> None:
        pass


def page_server(port: int = PORT, host: str = HOST, quiet: bool = False) -> ThreadingHTTPServer:
    """A server of ui/ bound to host:port (port 0: any free one), not yet serving."""
    handler = functools.partial(QuietPageFiles if quiet else PageFiles, directory=str(PAGE_DIR))
    return ThreadingHTTPServer((host, port), handler)


def origin(server: ThreadingHTTPServer) -> str:
    """What a browser sends as Origin from the page: the value TorchServe's cors_allowed_origin must hold."""
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def page_address(server: ThreadingHTTPServer, api: str = DEFAULT_API) -> str:
    """The page's address, with the prediction endpoint in it when it is not the page's default."""
    query = "" if api == DEFAULT_API else "?" + urllib.parse.urlencode({"api": api})
    return f"{origin(server)}/{query}"


def serve_in_background(server: ThreadingHTTPServer) -> threading.Thread:
    """For tests: serve from a daemon thread until server.shutdown()."""
    thread = threading.Thread(target=server.serve_forever, name="ui-page", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/ui_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=PORT, help="port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument(
        "--api",
        default=DEFAULT_API,
        help="the predictions URL the page posts to (default: %(default)s; a cluster through `kubectl port-forward` "
        "to local port 8080 answers there too)",
    )
    args = parser.parse_args(argv)
    try:
        server = page_server(args.port)
    except OSError as error:
        print(
            f"error: cannot listen on {HOST}:{args.port} ({error.strerror}); choose another with UI_PORT=...",
            file=sys.stderr,
        )
        return 1
    print(
        f"draw a digit: open {page_address(server, args.api)}  (it asks {args.api}; "
        f"the server must allow the origin {origin(server)}); Ctrl-C stops it",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
