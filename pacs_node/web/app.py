"""The web application: DICOMweb under /dicomweb, the dashboard at /, /metrics, behind a bearer
token.

With ``web.token`` set, every request must carry ``Authorization: Bearer <token>`` (compared
in constant time) and gets 401 without it; with no token the configuration refuses any address
but loopback (:mod:`pacs_node.config`). The server is uvicorn in its own process (``pacs-node
web``, started by ``serve`` when ``web.enabled``), so no HTTP client, slow or hostile, shares a
thread or a lock with the DIMSE services; ``web.max_connections`` bounds the connections it
serves at once (the rest get 503), and a request's headers must arrive within uvicorn's limits.
HTTPS uses the DICOM TLS certificate and key when ``[tls]`` is enabled.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from pacs_node.audit import AuditTrail
from pacs_node.config import Config
from pacs_node.web import dashboard, metrics
from pacs_node.web.dicomweb import DicomWeb
from storage.db import Database
from storage.files import FileStore

log = logging.getLogger(__name__)


class BearerToken:
    """ASGI middleware: 401 for an HTTP request without the configured token.

    ``Authorization: Bearer <token>`` is what programs send. A browser cannot be told to send
    that for a page, so HTTP Basic with the token as the password (any user name) is taken too:
    the 401 offers both challenges, and the browser asks its user for the token once. The same
    secret in the same header either way; use HTTPS beyond loopback.
    """

    def __init__(self, app: Any, token: str, trail: AuditTrail | None = None) -> None:
        self.app, self.token = app, token.encode()
        self.trail = trail
        self._last_audit: dict[str, tuple[float, int]] = {}  # client -> (when, suppressed)

    def _authorised(self, given: bytes, headers: dict[bytes, bytes]) -> bool:
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(credentials.strip(), self.token)
        if scheme.lower() == b"basic":
            # a browser sends its cached credentials with requests other sites make it send
            # (an <img> of a WADO URL): those are not the user's
            if headers.get(b"sec-fetch-site", b"") == b"cross-site":
                return False
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except ValueError:
                return False
            return hmac.compare_digest(decoded.partition(b":")[2], self.token)
        return False

    def _audit(self, client: str, path: str) -> None:
        """A wrong token is audited (User Authentication, failed), once a minute per client
        with how many were not: a flood of them must not fill the disk. A request without
        credentials is not: every browser's first request is one."""
        if self.trail is None:
            return
        now = time.monotonic()
        last, suppressed = self._last_audit.get(client, (-AUDIT_EVERY_S, 0))
        if now - last < AUDIT_EVERY_S:
            self._last_audit[client] = (last, suppressed + 1)
            return
        if len(self._last_audit) > 10_000:
            self._last_audit.clear()
        self._last_audit[client] = (now, 0)
        more = f" ({suppressed} more in the last minute, not audited)" if suppressed else ""
        self.trail.login_failed(client, f"wrong token{more}", path)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers", []))
            given = headers.get(b"authorization", b"")
            if not self._authorised(given, headers):
                if given:
                    client = scope.get("client") or ("?", 0)
                    self._audit(str(client[0]), scope.get("path", ""))
                response = PlainTextResponse(
                    "a token is required (Authorization: Bearer <web.token>, or HTTP Basic "
                    "with web.token as the password)\n",
                    status_code=401,
                )
                response.raw_headers += [
                    (b"www-authenticate", b'Bearer realm="pacs-node"'),
                    (b"www-authenticate", b'Basic realm="pacs-node", charset="UTF-8"'),
                ]
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


AUDIT_EVERY_S = 60.0


def build_app(
    config: Config,
    db: Database,
    files: FileStore,
    *,
    base_url: str,
    trail: AuditTrail | None = None,
) -> Any:
    """The ASGI application; *base_url* (scheme, host, port) is where clients reach it, for
    the URLs in DICOMweb answers."""
    trail = trail or AuditTrail(config, "web")
    dicomweb = DicomWeb(config, db, files, f"{base_url}/dicomweb", trail)

    async def home(request: Request) -> Response:
        return HTMLResponse(await asyncio.to_thread(dashboard.render, config, db))

    async def retry(request: Request) -> Response:
        if request.headers.get("x-requested-by") != "pacs-node":
            return PlainTextResponse("the X-Requested-By: pacs-node header is required\n", 403)
        try:
            asked = await request.json()
            kind, task_id = str(asked["kind"]), asked["id"]
        except Exception:
            return PlainTextResponse("expected JSON {kind: job|delivery, id: N}\n", 400)
        status, message = await asyncio.to_thread(dashboard.retry, db, kind, task_id)
        if status == 200:
            client = request.client.host if request.client else "?"
            log.info("dashboard: %s by %s", message, client)
        return PlainTextResponse(message + "\n", status)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    scrape = metrics.registry(db)

    async def metrics_page(request: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, scrape)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(dicomweb.close)  # the last refusal counts written

    app: Any = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", home),
            Route("/dashboard/retry", retry, methods=["POST"]),
            Route("/healthz", health),
            Route("/metrics", metrics_page),
            Mount("/dicomweb", routes=dicomweb.routes()),
        ],
    )
    if config.web.token:
        app = BearerToken(app, config.web.token, trail)
    return app
