"""HTTP API (FastAPI): thin handlers around :class:`serving.service.RecommendationService`.

``create_app(service, settings)`` builds the app; ``serve_in_thread(app, host, port)`` runs it under
uvicorn in a background thread (tests, Ray actors, benches) and returns a handle with ``.stop()``.
``reuse_port=True`` binds with ``SO_REUSEPORT`` (Linux): several processes, each with its own service
fed the same versions, listen on one port and the kernel spreads the connections over them (by a hash
of the connection's addresses, so one keep-alive connection stays with one process). Every answer names
the process that gave it: ``/healthz`` has ``pid``, and every response carries an ``X-Sitn-Pid`` header.

/recommend runs in the event-loop thread: a search is a sub-millisecond, lock-free read of the
current index snapshot (bench/bench_serving_http.py), cheaper than a hop to the thread pool. It returns
its JSON already encoded (orjson), the same document: FastAPI would otherwise validate the dict against
``RecommendationOut`` and encode it through pydantic (46-57 us for 10 items against orjson's 7-8 us,
measured on a loaded 2-core machine); ``response_model`` stays, for the OpenAPI docs. Admin handlers do
file I/O, so they are plain ``def`` and run in the thread pool.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import metrics
from serving.service import MAX_K, RecommendationService
from serving.settings import ServingSettings
from stream.events import MAX_ID_CHARS

logger = logging.getLogger(__name__)

ALLOWED = {"k": f"an integer in 1..{MAX_K}", "user_id": f"a string of 1..{MAX_ID_CHARS} characters"}
BEARER = HTTPBearer(auto_error=False)  # module level: FastAPI resolves handler annotations in globals
KNOWN_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})
PID_HEADER = "x-sitn-pid"  # on every response: which replica (process) answered


class ScoredItemOut(BaseModel):
    item_id: str
    score: float


class IndexInfoOut(BaseModel):
    version: int
    age_s: float
    items: int


class RecommendationOut(BaseModel):
    user_id: str
    k: int
    served_by: str  # "model" | "fused" | "popularity" | "cooccurrence"
    items: list[ScoredItemOut]
    index: IndexInfoOut


class SnapshotOut(BaseModel):
    path: str
    version: int
    items: int
    users: int


class LatencyMiddleware:
    """Observe every HTTP request in the latency histogram, labelled by route *template* (bounded), and name
    the answering process in the ``X-Sitn-Pid`` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._pid_header = (PID_HEADER.encode(), str(os.getpid()).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        status = 500

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), self._pid_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = getattr(scope.get("route"), "path", metrics.ROUTE_UNMATCHED)
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
            metrics.HTTP_REQUEST_SECONDS.labels(route, method, str(status)).observe(
                time.perf_counter() - started_s
            )


def _describe(value: Any) -> str:
    if isinstance(value, str) and len(value) > 40:
        return f"a string of {len(value)} characters"
    return repr(value)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 whose message names each bad parameter, what was received and what is allowed."""
    problems = []
    for error in exc.errors():
        loc = error.get("loc", ())
        name = str(loc[-1]) if loc else "request"
        received = "nothing" if error.get("type") == "missing" else _describe(error.get("input"))
        allowed = ALLOWED.get(name, error.get("msg", ""))
        problems.append(
            {"parameter": name, "in": str(loc[0]) if loc else "", "received": received, "allowed": allowed}
        )
    detail = "; ".join(f"{p['in']} parameter {p['parameter']!r}: received {p['received']}, allowed: {p['allowed']}"
                       for p in problems)  # fmt: skip
    return JSONResponse(status_code=422, content={"detail": detail, "errors": problems})


def create_app(service: RecommendationService, settings: ServingSettings) -> FastAPI:
    """The HTTP app over ``service``; ``settings`` supplies the admin token and snapshot path."""
    app = FastAPI(
        title="sitn-stream serving",
        description="Cross-domain recommendations from a live FAISS index of SITN embeddings.",
        version="1",
    )
    app.add_middleware(LatencyMiddleware)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]

    def require_admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        token = settings.admin_token
        if token is None:
            raise HTTPException(403, "admin endpoints are disabled: set SITN_SERVING_ADMIN_TOKEN")
        if credentials is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), token.get_secret_value().encode()):
            raise HTTPException(403, "invalid bearer token")

    def snapshot_path() -> str:
        if settings.snapshot_path is None:
            raise HTTPException(409, "no snapshot path configured: set SITN_SERVING_SNAPSHOT_PATH")
        return str(settings.snapshot_path)

    @app.get("/recommend", response_model=RecommendationOut)
    async def recommend(
        user_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS, description=ALLOWED["user_id"])],
        k: Annotated[int, Query(ge=1, le=MAX_K, description=ALLOWED["k"])] = 10,
    ) -> Response:
        """Top ``k`` items for ``user_id``; ``served_by`` says which ranker answered: the model, ``fused`` (the
        model's scores fused with item co-occurrence with the user's consumed items, while the learner says it
        ranks best), popularity (users without vectors, or while the learner says popularity beats the learnt
        rankers), or item co-occurrence with the user's consumed items (while the learner says it beats them)."""
        try:
            rec = service.recommend(user_id, k)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        body = {
            "user_id": rec.user_id,
            "k": k,
            "served_by": rec.served_by,
            "items": [{"item_id": s.item_id, "score": s.score} for s in rec.items],
            "index": {
                "version": rec.index_version,
                "age_s": round(rec.index_age_s, 3),
                "items": rec.index_size,
            },
        }  # the shape of RecommendationOut
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness plus index state, the version applied last (``applied_version``), the ranker ``/recommend``
        answers with and the fused ranker's weight, and ``pid``: the process that answered (one of several
        replicas on one port); ``ready`` is false while the index is empty."""
        return {"status": "ok", "pid": os.getpid(), **service.health()}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition."""
        service.refresh_gauges()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/snapshot", response_model=SnapshotOut, dependencies=[Depends(require_admin)])
    def admin_snapshot() -> dict[str, Any]:
        """Write a full snapshot (items, users, consumed sets, popularity) to the configured path."""
        info = service.save_snapshot(snapshot_path())
        return {"path": info.path, "version": info.version, "items": info.items, "users": info.users}

    @app.post("/admin/reload", response_model=SnapshotOut, dependencies=[Depends(require_admin)])
    def admin_reload() -> dict[str, Any]:
        """Replace all state from the configured snapshot; requests keep being served meanwhile."""
        path = snapshot_path()
        try:
            info = service.restore_snapshot(path)
        except FileNotFoundError:
            raise HTTPException(404, f"snapshot file not found: {path}") from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"path": info.path, "version": info.version, "items": info.items, "users": info.users}

    return app


@dataclass
class ServerHandle:
    """A uvicorn server running in a background thread."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"HTTP server on {self.url} did not stop within {timeout_s} s")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (not listening yet): every process that binds
    the same port this way joins one group, and the kernel spreads new connections over those that listen.

    Raises ``OSError`` when the port is held by a socket bound without ``SO_REUSEPORT`` (or by another user),
    and ``RuntimeError`` on a system without ``SO_REUSEPORT`` load balancing (only Linux spreads connections).
    """
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError(f"reuse_port needs Linux's SO_REUSEPORT load balancing; this is {sys.platform!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def serve_in_thread(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 10.0, reuse_port: bool = False
) -> ServerHandle:
    """Start uvicorn on ``host:port`` (0 picks a free port) in a daemon thread; return once it listens.

    ``reuse_port``: bind with ``SO_REUSEPORT`` (:func:`reuse_port_socket`), so that other processes can listen
    on the same port; pass the port the first one got to the others.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    sockets = [reuse_port_socket(host, port)] if reuse_port else None
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, name="sitn-serving-http", daemon=True)
    thread.start()
    deadline_s = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"HTTP server on {host}:{port} exited during start-up; see the log")
        if time.monotonic() > deadline_s:
            server.should_exit = True
            raise TimeoutError(f"HTTP server on {host}:{port} did not start within {start_timeout_s} s")
        time.sleep(0.005)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    logger.info("http server started host=%s port=%d reuse_port=%s", host, bound_port, reuse_port)
    return ServerHandle(server, thread, host, bound_port)
