"""Teach-in credentials: named bearer tokens in a file only its owner can read.

Teaching a model changes what the line accepts, so the service accepts it only with a token from
this file, from any address (behind a reverse proxy every request comes from 127.0.0.1, so the
address proves nothing). The file holds one ``NAME TOKEN`` pair per line (``#`` starts a
comment); the name is what a model's history records as who taught it. ``patchcore serve``
creates the file with one token at first start; ``patchcore teach-token NAME`` adds others. It is
read again on every teach-in, so a token added or removed takes effect without a restart.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

#: Where ``patchcore serve`` keeps its tokens unless told otherwise.
DEFAULT_TOKEN_FILE = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "patchcore" / "teach-tokens"
#: Letters a token name may use (it is written into model histories and log lines).
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


class TokenFileError(ValueError):
    """The token file cannot be used (unsafe permissions, malformed line)."""


def _check_name(name: str) -> str:
    if not name or not set(name) <= _NAME_CHARACTERS:
        raise ValueError(f"token name {name!r}: use letters, digits and . _ - @ only")
    return name


def read_tokens(path: str | os.PathLike) -> dict[str, str]:
    """``{token: name}`` from a token file; refuses a file that others may read (on POSIX)."""
    path = Path(path)
    if os.name == "posix":
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenFileError(f"{path}: teach-in tokens must be readable by their owner only "
                                 f"(mode {stat.filemode(mode)}); run: chmod 600 {path}")
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise TokenFileError(f"{path}, line {number}: expected 'NAME TOKEN' with a token of at least 16 characters")
        tokens[parts[1]] = _check_name(parts[0])
    return tokens


def add_token(path: str | os.PathLike, name: str) -> str:
    """Append a new random token for ``name`` to the token file (created readable by its owner
    only); returns the token."""
    path = Path(path)
    _check_name(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        existing = read_tokens(path)
        if name in existing.values():
            raise ValueError(f"{path}: a token named {name!r} exists already; remove its line to replace it")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(f"{name} {token}\n")
    return token


def ensure_token_file(path: str | os.PathLike, name: str = "supervisor") -> tuple[Path, str | None]:
    """The token file at ``path``, created with one token for ``name`` if there is none yet;
    returns the path and the new token (``None`` when the file existed)."""
    path = Path(path)
    if path.exists():
        read_tokens(path)  # refuse an unsafe or malformed file at start-up, not at the first teach-in
        return path, None
    return path, add_token(path, name)


class TeachTokens:
    """Checks bearer tokens against a token file, read again on every check."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        read_tokens(self.path)

    def name_of(self, token: str) -> str | None:
        """The name of ``token``, or ``None`` when the file does not hold it (compared in constant time)."""
        found = None
        for known, name in read_tokens(self.path).items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = name
        return found
