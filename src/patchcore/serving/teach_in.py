"""Teach-in and rollback: the only requests that change a model, so each is credentialed, bounded
and recorded. (The routes are in :mod:`.routes_teach_in`; this is what they do.)

- **Credentialed.** ``Authorization: Bearer TOKEN`` with a token of the service's token file
  (:mod:`.teach_tokens`), from any address, loopback included: behind a reverse proxy every
  request comes from 127.0.0.1. A browser request from another site (``Origin`` or
  ``Sec-Fetch-Site`` say so) is refused before the token is looked at, so a web page open on the
  station cannot teach (cross-site request forgery). Without a token file teach-in is off.
- **Bounded.** At most ``max_images`` images and ``max_megapixels`` decoded pixels per request
  (counted from the images' headers before anything is decoded); decoding and teaching run in an
  inference slot, as scoring does; the memory bank's cap (``max_bank_size``) is honoured (409 when
  the bank is full).
- **Recorded and reversible.** Each teach-in and rollback is a new model version, written under
  the model directory's lock (so workers of one service, or a command line beside it, never
  overwrite each other), with the token's name in the history.
"""

from __future__ import annotations

import copy
import hashlib
import io
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urlsplit

from PIL import Image

from ..engine.detector import BankFullError
from ..engine.digest import SHA256_INFO
from ..engine.persistence import model_lock, rollback
from ..errors import ImageLoadError
from .guard import ServiceError
from .inference import InferenceRunner
from .models import ModelRegistry
from .teach_tokens import TeachTokens, TokenFileError

#: Images one teach-in request may carry by default.
DEFAULT_MAX_IMAGES = 16
#: Decoded megapixels one teach-in request may carry by default (16 photos of 4 megapixels).
DEFAULT_MAX_MEGAPIXELS = 64.0


@dataclass(frozen=True)
class TeachInPolicy:
    """Who may teach and how much: the token file (``None``: teach-in off), the browser origins
    allowed besides the service's own, and the per-request bounds."""

    tokens: TeachTokens | None
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    max_images: int = DEFAULT_MAX_IMAGES
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_origin(headers: Mapping[str, str], allowed: frozenset[str]) -> None:
    """Refuse browser requests made by a page of another site (403).

    Browsers say where a request comes from (``Sec-Fetch-Site``, ``Origin``) and pages cannot
    forge either. The service's own page is same-origin: its ``Origin`` names the host the
    browser asked for, which the service sees as ``Host`` (or, behind a proxy, as
    ``X-Forwarded-Host`` or one of ``allowed``). Clients that are not browsers send neither header.
    """
    site = headers.get("sec-fetch-site", "").lower()
    origin = headers.get("origin")
    if site in ("cross-site", "same-site") and (origin is None or _origin_of(origin) not in allowed):
        raise ServiceError(403, "teach-in is not accepted from a web page of another site")
    if origin is None:
        return
    hosts = {headers.get("host", "").lower()}
    hosts |= {host.strip().lower() for host in headers.get("x-forwarded-host", "").split(",") if host.strip()}
    if origin.lower() == "null" or (urlsplit(origin).netloc.lower() not in hosts and _origin_of(origin) not in allowed):
        raise ServiceError(403, f"teach-in is not accepted from a web page of another site (Origin {origin})")


def authorise(headers: Mapping[str, str], policy: TeachInPolicy) -> str:
    """The name of the request's teach-in token; 403 when teach-in is off or the request is
    cross-site, 401 when the token is missing or unknown."""
    if policy.tokens is None:
        raise ServiceError(403, "teach-in is off: the service was started without a teach-in token file")
    check_origin(headers, policy.allowed_origins)
    scheme, _, token = headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="patchcore teach-in"'}
    if scheme.lower() != "bearer" or not token.strip():
        raise ServiceError(401, "teach-in needs a token: send the header 'Authorization: Bearer TOKEN' with a token "
                                "from the service's token file", challenge)
    try:
        name = policy.tokens.name_of(token.strip())
    except (OSError, TokenFileError) as error:
        raise ServiceError(403, f"teach-in is off: the token file cannot be read ({error})") from None
    if name is None:
        raise ServiceError(401, "the teach-in token is not valid", {**challenge,
                           "WWW-Authenticate": 'Bearer realm="patchcore teach-in", error="invalid_token"'})
    return name


def check_megapixels(files: list[tuple[bytes, str]], max_megapixels: float) -> None:
    """Refuse (413) a request whose images would decode to more than ``max_megapixels`` in all,
    from their headers alone (nothing is decoded); unreadable headers are left to the decoder."""
    total = 0
    for data, _ in files:
        try:
            with Image.open(io.BytesIO(data)) as image:
                total += image.width * image.height
        except Exception:  # noqa: BLE001 - the decoder says precisely what is wrong, in the slot
            continue
    if total > max_megapixels * 1e6:
        raise ServiceError(413, f"the images hold {total / 1e6:.1f} megapixels; a teach-in request may hold at most "
                                f"{max_megapixels:g} (send fewer or smaller images per request)")


def teach(models: ModelRegistry, name: str, files: list[tuple[bytes, str]], who: str,
          runner: InferenceRunner) -> dict:
    """Decode, add and save as a new version, under the model's locks (this process's and the
    directory's): the version taught is always the newest on disk."""
    directory = models[name].directory
    with models.lock(name), model_lock(directory):
        current = models[name]  # the newest version on disk (another worker may have taught it)
        photos = []
        for data, filename in files:
            try:
                photo = runner.decode(current, data, filename)
            except ImageLoadError as error:
                raise runner.refusal(error) from None
            photo.info[SHA256_INFO] = hashlib.sha256(data).hexdigest()
            photos.append(photo)
        model = copy.copy(current.model)  # requests in flight keep scoring with the old bank
        try:
            model.partial_fit(photos)
        except BankFullError as error:
            raise ServiceError(409, str(error)) from None
        model.save(directory, event={"action": "teach-in", "who": who, "via": "service"})
        taught = models.install(name, model)
    return {"model": name, "version": taught.version, **model.teach_in_[-1], "threshold": taught.threshold,
            "threshold_kind": model.threshold_kind()}


def roll_back(models: ModelRegistry, name: str, to: int | None, who: str) -> dict:
    directory = models[name].directory
    with models.lock(name), model_lock(directory):
        try:
            manifest = rollback(directory, to, who=who, details={"via": "service"})
        except ValueError as error:
            raise ServiceError(409, str(error)) from None
        restored = models[name]
    return {"model": name, "version": manifest["version"], "restored_version": manifest["event"]["to_version"],
            "memory_bank_size": int(restored.model.memory_bank_.shape[0]), "threshold": restored.threshold}
