"""The web page (``/``) and its static files, outside the OpenAPI description."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .guard import ServiceError

_STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: For the web page only (FastAPI's /docs loads Swagger UI from a CDN with inline script).
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


def static_response(filename: str) -> Response:
    """One of the page's files, read from the installed package."""
    try:
        content = (resources.files("patchcore.serving") / "static" / filename).read_bytes()
    except (FileNotFoundError, OSError):
        raise ServiceError(404, "page not installed (patchcore/serving/static is missing from the package)") from None
    return Response(content, media_type=_STATIC_FILES[filename],
                    headers={"cache-control": "no-cache", "content-security-policy": _PAGE_CSP})


@router.api_route("/", methods=["GET", "HEAD"])
def index() -> Response:
    return static_response("index.html")


@router.get("/static/{filename}")
def static_file(filename: str) -> Response:
    if filename not in _STATIC_FILES:
        raise ServiceError(404, "not found")
    return static_response(filename)
