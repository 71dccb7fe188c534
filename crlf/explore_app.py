"""``crlf explore``'s web server: a small Flask app over an explore ``Space`` (needs ``pip install 'crlf[explore]'``).

Routes (all answers JSON but the page, its script and the thumbnails; every error is JSON {"error": message}):
    GET  /                       the page (crlf/static/explore.html: canvas map, neighbours, uploads, search)
    GET  /map.js                 the map component the page and visualize's static map share
    GET  /api/info               title, counts, projection, class names, whether uploads / the probe are on
    GET  /api/points             the map: x, y in [0, 1], labels, ids
    GET  /api/thumb/<i>          point i's image as PNG
    GET  /api/neighbors/<i>?k=   the k nearest points by cosine similarity
    GET  /api/search?q=          indices of points whose class or id contains q
    POST /api/embed?k=           form field "image": its embedding, nearest points and the probe's class
Safe by default: images are served by index only (no path from a request reaches the file system; Flask's own
static route is off), uploads are size-limited and decoded by the folder source's guarded decoder, a request whose
Host header is not a name the server was started for is refused (403: no page of another site can read the space
through DNS rebinding), and a bad request is a 4xx with a message, never a traceback or an HTML page (not even the
ones werkzeug's server answers before Flask sees the request: a garbage or too long request line, too many headers).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import socket
import threading
import time
import webbrowser
from collections.abc import Collection, Iterable
from importlib import resources
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from crlf.engine.explore import MAX_NEIGHBORS, Space
from crlf.errors import InputError

log = logging.getLogger("crlf.explore")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_QUERY = 200  # characters of a search


def static_text(name: str) -> str:
    """A file of crlf/static/ (package data)."""
    return resources.files("crlf").joinpath("static", name).read_text(encoding="utf-8")


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The host names requests may name in their Host header: the loopback names, the address served on (--host)
    and --allow-host's (lower case, IPv6 without brackets); None, answering any, when `extra` holds "*"."""
    names = {name.lower().strip("[]") for name in (*LOCAL_HOSTS, host, *extra)}
    return None if "*" in names else frozenset(names)


def host_name(header: str) -> str:
    """The name of a Host header without its port, lower case: '[::1]:8765' -> '::1', 'Example:80' -> 'example'."""
    header = header.strip().lower()
    if header.startswith("[") and "]" in header:
        return header[1 : header.index("]")]
    return header.partition(":")[0]


def create_app(space: Space, neighbors: int = 10, max_upload_bytes: int = 10_000_000,
               hosts: Collection[str] | None = LOCAL_HOSTS) -> Flask:  # fmt: skip
    """The Flask app serving `space`; `neighbors` is the page's k, `max_upload_bytes` the largest request body,
    `hosts` the names the Host header may give (allowed_hosts(); None: any)."""
    app = Flask(__name__, static_folder=None)  # no static route: nothing is served by path
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    page, script = static_text("explore.html"), static_text("map.js")

    def k_arg() -> int:
        try:
            k = int(request.args.get("k", neighbors))
        except ValueError:
            raise InputError(f"k must be a whole number between 1 and {MAX_NEIGHBORS}") from None
        if not 1 <= k <= MAX_NEIGHBORS:
            raise InputError(f"k must be between 1 and {MAX_NEIGHBORS}, not {k}")
        return k

    def index(i: int) -> int:
        if i >= len(space):
            raise _NotFound(f"no point {i}: the space has {len(space):,} points (0 to {len(space) - 1})")
        return i

    @app.before_request
    def known_host() -> tuple[Response, int] | None:  # against DNS rebinding: a browser always sends Host
        header = request.headers.get("Host")
        if hosts is None or header is None or host_name(header) in hosts:
            return None
        name = host_name(header)
        option = name if re.fullmatch(r"[a-z0-9.-]+|[0-9a-f:.]+", name) else "NAME"
        return jsonify({"error": f"this server does not answer to the host name {name[:100]!r} (only to "
                        f"{', '.join(sorted(hosts))}): start crlf explore with --allow-host {option} "
                        "to reach it by that name"}), 403  # fmt: skip

    @app.get("/")
    def home() -> Response:
        return Response(page, mimetype="text/html")

    @app.get("/map.js")
    def map_js() -> Response:
        return Response(script, mimetype="text/javascript")

    @app.get("/api/info")
    def info() -> Response:
        return jsonify({**space.info(), "neighbors": neighbors, "max_upload_bytes": max_upload_bytes})

    @app.get("/api/points")
    def points() -> Response:
        return jsonify(space.points())

    @app.get("/api/thumb/<int:i>")
    def thumb(i: int) -> Response:
        response = Response(space.thumbnail(index(i)), mimetype="image/png")
        response.headers["Cache-Control"] = "max-age=3600"
        return response

    @app.get("/api/neighbors/<int:i>")
    def neighbours(i: int) -> Response:
        return jsonify({**space.describe(index(i)), "neighbors": space.neighbors(i, k_arg())})

    @app.get("/api/search")
    def search() -> Response:
        query = request.args.get("q", "")
        if len(query) > MAX_QUERY:
            raise InputError(f"q must be at most {MAX_QUERY} characters, not {len(query):,}")
        return jsonify({"query": query, "indices": space.search(query)})

    @app.post("/api/embed")
    def embed() -> Response:
        k = k_arg()
        upload = request.files.get("image")
        if upload is None:
            raise InputError("no image in the request: send the file as the form field 'image'")
        return jsonify(space.query_image(upload.stream, upload.filename or "", k))

    @app.errorhandler(InputError)
    def bad_input(e: InputError) -> tuple[Response, int]:
        return jsonify({"error": str(e)}), 400

    @app.errorhandler(_NotFound)
    def not_found(e: _NotFound) -> tuple[Response, int]:
        return jsonify({"error": str(e)}), 404

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        message = {413: f"the upload is larger than the {max_upload_bytes / 1e6:g} MB allowed (--max-upload-mb)"}
        return jsonify({"error": message.get(e.code or 0, e.description or e.name)}), e.code or 500

    @app.errorhandler(Exception)
    def unexpected(e: Exception) -> tuple[Response, int]:  # the last line of defence: one log line, no traceback
        log.error("%s %s: unexpected %s: %s", request.method, request.path, type(e).__name__, e)
        return jsonify({"error": f"unexpected {type(e).__name__} (see the server's log)"}), 500

    return app


class _NotFound(Exception):
    """A point index beyond the space (Flask's int converter already refuses anything that is not a number)."""


class _Handler(WSGIRequestHandler):
    """Request lines at debug level on crlf's logger (--verbose), not werkzeug's banner and lines on stderr; the
    errors http.server answers itself in JSON like the app's."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug('"%s" %s %s', self.requestline, code, size)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """{"error": ...} for a request http.server refuses before the app sees it (its own page is HTML)."""
        reason = self.responses.get(code, ("Error", ""))[0]
        error = _SERVER_ERRORS.get(code, reason.lower())
        if code == 431:
            error += f" ({'more than 100 headers' if message == 'Too many headers' else 'a header is over 64 KiB'})"
        log.debug("refused a request: %d %s: %s", code, message or reason, explain or "")
        body = json.dumps({"error": error}).encode()
        self.request_version = self.protocol_version  # a status line and headers even when no version was read
        self.send_response(code, reason)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._drain()

    def _drain(self) -> None:
        """Read what the client still sends (a bounded while) after an error answer, so that closing with unread
        bytes does not reset the connection before the client has read the answer."""
        deadline = time.monotonic() + 2.0
        try:
            self.connection.shutdown(socket.SHUT_WR)
            for _ in range(256):  # at most 16 MiB
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.connection.recv(65536):
                    break
        except OSError:  # the client has gone, or the time is up: close as http.server would
            pass


_SERVER_ERRORS = {
    400: "not an HTTP request: the request line must read METHOD /path HTTP/1.1",
    414: "the request line is longer than 64 KiB: shorten the URL",
    431: "the request's headers are too large",
    505: "unsupported HTTP version: use HTTP/1.0 or HTTP/1.1",
}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), taken before the long work so that a port in use fails
    at once; InputError when the address cannot be used (werkzeug itself would print and exit)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise InputError(f"cannot serve on --host {host}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use: choose another --port (0: any free one)") from None
        raise InputError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    return sock


def start(app: Flask, sock: socket.socket, host: str) -> BaseWSGIServer:
    """A threaded werkzeug server on the bound socket `sock` (it takes its own copy), ready for serve()."""
    try:
        return make_server(host, sock.getsockname()[1], app, threaded=True, request_handler=_Handler,
                           fd=sock.fileno())  # fmt: skip
    finally:
        sock.close()


def url_of(server: BaseWSGIServer) -> str:
    host = server.host if server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{server.port}/"


def serve(server: BaseWSGIServer, open_browser: bool = False) -> None:
    """Serve until Ctrl-C (which ends it normally); with open_browser, open the page in the default browser."""
    if server.host not in LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach this machine on port %d can see the images and upload to "
                    "it; use --host 127.0.0.1 to keep it local (a browser that reaches it by another name than %s "
                    "needs --allow-host NAME)", server.host, server.port, server.host)  # fmt: skip
    log.info("crlf explore: %s (Ctrl-C stops it)", url_of(server))
    if open_browser:
        threading.Thread(target=webbrowser.open, args=(url_of(server),), daemon=True).start()
    server.serve_forever()  # werkzeug's returns on Ctrl-C and closes the socket
    log.info("stopped")


def summary(server: BaseWSGIServer, space: Space) -> dict[str, Any]:
    """What --json prints when the server is listening."""
    return {"url": url_of(server), "host": server.host, "port": server.port, **space.info()}
