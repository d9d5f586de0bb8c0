"""Errors answered as JSON, and the ASGI guard every request passes first.

The guard refuses a body over the limit before a byte is read (``Content-Length``) and counts the
bytes while they arrive (a missing or lying header does not help), adds security headers, and
records request metrics by route template.
"""

from __future__ import annotations

import json
import time

from .metrics import Metrics

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class ServiceError(Exception):
    """An error answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class UploadTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is larger than the limit of {limit} bytes ({limit / 2**20:.1f} MiB)")


async def send_json(send, status: int, body: dict) -> None:
    """Answer a raw ASGI request with JSON and close the connection."""
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    """Pure ASGI middleware: body limit, security headers, request metrics."""

    def __init__(self, app, max_body_bytes: int, upload_limit: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_limit = upload_limit
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            length = None
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        await send_json(send_wrapper, 400, {"error": "invalid Content-Length header"})
                        return
            if length is not None and length > self.max_body_bytes:
                await send_json(send_wrapper, 413, {"error": str(UploadTooLarge(self.upload_limit))})
                return
            received = 0

            async def receive_wrapper():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise UploadTooLarge(self.upload_limit)
                return message

            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(endpoint, scope.get("method", "?"), status_holder["status"], time.perf_counter() - started)
