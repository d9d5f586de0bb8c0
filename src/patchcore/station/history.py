"""The history database: every verdict of ``patchcore watch`` and of the service, and the reviews
people give them (tables: :mod:`.schema`).

Open one with :class:`History` (a SQLite file path, ``sqlite:///...`` or ``postgresql://...``);
the schema is brought to the newest Alembic migration on open, in one transaction under a lock
(SQLite's write lock, a PostgreSQL advisory lock), so several stations may open one database at
once. The query methods return detached rows
(read their fields freely after the session closed), newest first::

    history = History("out/history.db")
    for row in history.inspections(verdict="ng", limit=20):
        print(row.at, row.photo_path, row.score, [crop.picture_path for crop in row.evidence])
    history.add_review(row.id, "false_alarm", who="anna")

SQLite is opened in WAL mode (a page may read while a station writes) with ``synchronous=FULL``
(a committed verdict survives a power cut); keep its file on a local disk, as SQLite asks.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

from sqlalchemy import Engine, and_, create_engine, event, func, or_, select, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.orm import aliased, selectinload, sessionmaker

from ..errors import PatchCoreError
from . import DEFAULT_FILE
from .schema import REVIEW_VERDICTS, VERSION_TABLE, EvidenceCrop, Inspection, Review, utc_now

MIGRATIONS = Path(__file__).with_name("migrations")
#: Seconds a SQLite writer waits for another one (the service and a station on one file).
SQLITE_BUSY_SECONDS = 30
#: Seconds after which a teach-in queue entry claimed by an apply that never finished (its
#: process died) waits in the queue again.
CLAIM_SECONDS = 600
#: Key of the PostgreSQL advisory lock held while migrating (any constant shared by all stations).
_MIGRATION_LOCK = 0x7061746368636F72  # "patchcor"

__all__ = ["DEFAULT_FILE", "EvidenceCrop", "History", "HistoryError", "Inspection", "Review", "database_url"]


class HistoryError(PatchCoreError, ValueError):
    """The history database cannot be opened, migrated or written; the message names it."""


def database_url(location: str | os.PathLike) -> URL:
    """The SQLAlchemy URL of ``location``: a file path (SQLite), ``sqlite:///file``, or
    ``postgresql://...`` (driven by psycopg 3, else psycopg2, whichever is installed)."""
    text_location = os.fspath(location)
    if "://" not in text_location:
        return URL.create("sqlite", database=str(Path(text_location).expanduser().absolute()))
    try:
        url = make_url(text_location)
    except ArgumentError as error:
        raise HistoryError(f"{text_location}: not a database URL ({error})") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername=f"postgresql+{_postgresql_driver(text_location)}")
    elif url.get_backend_name() not in ("sqlite", "postgresql"):
        raise HistoryError(f"{url.render_as_string(hide_password=True)}: the history database must be SQLite "
                           "(a file path or sqlite:///FILE) or PostgreSQL (postgresql://...)")
    return url


def _postgresql_driver(location: str) -> str:
    import importlib.util

    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return driver
    raise HistoryError(f"{make_url(location).render_as_string(hide_password=True)}: PostgreSQL needs a driver; "
                       "install one with: pip install 'patchcore[postgresql]'")


#: Execution option of the connections that write: on SQLite they begin with ``BEGIN IMMEDIATE``.
WRITES = "patchcore_writes"


def _sqlite_connect(connection, record) -> None:
    # pysqlite's own transactions begin late (at the first INSERT: reads before it, and DDL, run
    # outside any transaction); SQLAlchemy's "begin" event says BEGIN itself (_sqlite_begin).
    connection.isolation_level = None
    cursor = connection.cursor()
    _use_wal(cursor)
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _use_wal(cursor) -> None:
    """Put the file in WAL mode (once; it stays so). The switch needs the file to itself and,
    unlike other statements, fails at once rather than wait when another connection is in it
    (stations opening a new file together): so it is tried again for up to the busy timeout."""
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_begin(connection) -> None:
    """A writer takes SQLite's write lock at once (waiting for another writer up to the busy
    timeout), so that no transaction of it finds after a read that it cannot write; readers
    take no lock (WAL)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get(WRITES) else "BEGIN")


def _engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:" and not Path(url.database).parent.is_dir():
            raise HistoryError(f"{url.database}: the folder of the history database does not exist")
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _alembic_config(connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _current_revision(connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine, name: str) -> None:
    """Bring the database of ``engine`` to the newest schema (nothing to do when it is there).
    ``name`` names it in errors. A database of a newer patchcore is refused, not touched."""
    from alembic import command
    from alembic.script import ScriptDirectory

    with engine.connect() as connection:
        scripts = ScriptDirectory.from_config(_alembic_config(connection))
        head = scripts.get_current_head()
        current = _current_revision(connection)
    if current == head:
        return
    if current is not None and current not in {script.revision for script in scripts.walk_revisions()}:
        raise HistoryError(f"{name}: the history database is at schema revision {current}, which this patchcore does "
                           f"not know (it knows up to {head}); it was written by a newer patchcore: upgrade this one")
    # One station migrates; the others wait here (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory
    # lock), then find the schema new. DDL is transactional on both: a failed migration leaves none.
    with engine.execution_options(**{WRITES: True}).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        if _current_revision(connection) != head:
            command.upgrade(_alembic_config(connection), "head")


class History:
    """The history database at ``location`` (see :func:`database_url`), migrated on open.

    Writing: :meth:`record` adds inspections in one transaction (see
    :class:`~patchcore.station.writer.HistoryWriter` for writing beside scoring). Reading:
    :meth:`inspections`, :meth:`count_inspections`, :meth:`inspection`, :meth:`find_watched`,
    :meth:`scores`, :meth:`recent_scores`, :meth:`verdict_counts`, :meth:`model_names`. Reviews:
    :meth:`add_review`, :meth:`reviewed`; the teach-in queue: :meth:`teach_in_queue`,
    :meth:`claim_teach_in`, :meth:`finish_teach_in`, :meth:`release_teach_in`.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.url = database_url(location)
        #: The database as shown in messages (password hidden).
        self.name = self.url.render_as_string(hide_password=True)
        self.engine = _engine(self.url)
        try:
            upgrade(self.engine, self.name)
        except DBAPIError as error:
            self.engine.dispose()
            raise HistoryError(f"{self.name}: cannot open the history database: {_reason(error)}") from None
        except BaseException:
            self.engine.dispose()
            raise
        #: Sessions for reading, and for writing (on SQLite: holding the write lock from their start).
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.writing_sessions = sessionmaker(self.engine.execution_options(**{WRITES: True}), expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------

    def record(self, inspections: Sequence[Inspection]) -> None:
        """Add ``inspections`` (with their evidence) in one transaction: all or none. Raises
        :class:`HistoryError` when ``watch`` already recorded one of them (same station, path and bytes)."""
        try:
            with self.writing_sessions.begin() as session:
                session.add_all(inspections)
        except IntegrityError as error:
            reason = _reason(error)
            if "unique" in reason.lower() or "duplicate" in reason.lower():
                raise HistoryError(f"{self.name}: refused to record twice: {reason}") from None
            raise HistoryError(f"{self.name}: refused an inspection: {reason}") from None
        except StatementError as error:  # a value the columns cannot take (a time without its zone)
            if isinstance(error.orig, ValueError):
                raise HistoryError(f"{self.name}: {error.orig}") from None
            raise

    def set_stored_path(self, inspection_id: int, stored_path: str | None) -> None:
        """Say where a photo lies now (``watch`` moved it somewhere other than planned)."""
        with self.writing_sessions.begin() as session:
            session.get_one(Inspection, inspection_id).stored_path = stored_path

    def add_review(self, inspection_id: int, verdict: str, who: str, note: str | None = None,
                   at: dt.datetime | None = None, verified: bool = False) -> Review:
        """Record ``who``'s judgement of inspection ``inspection_id``: ``false_alarm`` or ``confirmed_defect``.
        ``verified``: ``who`` is the name of a teach-in token the reviewer showed, not a name as typed."""
        if verdict not in REVIEW_VERDICTS:
            raise HistoryError(f"review verdict must be one of {', '.join(REVIEW_VERDICTS)}, got {verdict!r}")
        if not who or not who.strip():
            raise HistoryError("a review needs the name of who gave it")
        review = Review(inspection_id=inspection_id, verdict=verdict, who=who.strip(), note=note, at=at or utc_now(),
                        who_verified=verified)
        with self.writing_sessions.begin() as session:
            if session.get(Inspection, inspection_id) is None:
                raise HistoryError(f"{self.name}: no inspection {inspection_id} to review")
            session.add(review)
        return review

    # -- reading -------------------------------------------------------------------------------

    def find_watched(self, station: str, photo_path: str, photo_sha256: str) -> Inspection | None:
        """The inspection ``watch`` at ``station`` made of these bytes under this path, if any."""
        with self.sessions() as session:
            return session.scalars(select(Inspection).where(
                Inspection.source == "watch", Inspection.station == station, Inspection.photo_path == photo_path,
                Inspection.photo_sha256 == photo_sha256)).first()

    def inspection(self, inspection_id: int) -> Inspection | None:
        """One inspection with its evidence and reviews, or ``None``."""
        with self.sessions() as session:
            return session.scalars(select(Inspection).where(Inspection.id == inspection_id)
                                   .options(selectinload(Inspection.evidence), selectinload(Inspection.reviews))).first()

    def inspections(self, *, source: str | None = None, station: str | None = None, model_name: str | None = None,
                    verdict: str | Iterable[str] | None = None, since: dt.datetime | None = None,
                    until: dt.datetime | None = None, reviewed: bool | None = None, limit: int | None = 100,
                    offset: int = 0, newest_first: bool = True, min_score: float | None = None,
                    max_score: float | None = None) -> list[Inspection]:
        """Inspections matching every filter given, with their evidence and reviews: ``since``
        inclusive, ``until`` exclusive; ``reviewed``: only those with (``True``) or without
        (``False``) a review; ``min_score`` and ``max_score`` inclusive (photos without a score
        are left out by either); ``limit=None`` for all."""
        query = select(Inspection).where(*self._listing_filters(source, station, model_name, verdict, since, until,
                                                                reviewed, min_score, max_score))
        order = (Inspection.at.desc(), Inspection.id.desc()) if newest_first else (Inspection.at, Inspection.id)
        query = query.order_by(*order).offset(offset).limit(limit)
        with self.sessions() as session:
            return list(session.scalars(query.options(selectinload(Inspection.evidence),
                                                      selectinload(Inspection.reviews))))

    def count_inspections(self, *, source: str | None = None, station: str | None = None,
                          model_name: str | None = None, verdict: str | Iterable[str] | None = None,
                          since: dt.datetime | None = None, until: dt.datetime | None = None,
                          reviewed: bool | None = None, min_score: float | None = None,
                          max_score: float | None = None) -> int:
        """How many inspections :meth:`inspections` would list with these filters and no limit (for paging)."""
        query = select(func.count()).select_from(Inspection).where(*self._listing_filters(
            source, station, model_name, verdict, since, until, reviewed, min_score, max_score))
        with self.sessions() as session:
            return int(session.scalar(query) or 0)

    def model_names(self) -> list[str]:
        """Every model name the history holds verdicts of, sorted."""
        with self.sessions() as session:
            return list(session.scalars(select(Inspection.model_name).distinct().order_by(Inspection.model_name)))

    def verdict_counts(self, *, source: str | None = None, station: str | None = None, model_name: str | None = None,
                       since: dt.datetime | None = None, until: dt.datetime | None = None) -> dict[str, int]:
        """``{verdict: number of inspections}`` over the filters."""
        query = (select(Inspection.verdict, func.count()).where(*self._filters(source, station, model_name, None, since, until))
                 .group_by(Inspection.verdict))
        with self.sessions() as session:
            return {verdict: count for verdict, count in session.execute(query)}

    def scores(self, model_name: str, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
               source: str | None = None) -> list[tuple[dt.datetime, float, int]]:
        """``(at, score, model_version)`` of every scored photo of ``model_name``, oldest first (for drift)."""
        query = (select(Inspection.at, Inspection.score, Inspection.model_version)
                 .where(*self._filters(source, None, model_name, None, since, until), Inspection.score.is_not(None))
                 .order_by(Inspection.at, Inspection.id))
        with self.sessions() as session:
            return [tuple(row) for row in session.execute(query)]

    def recent_scores(self, model_name: str, limit: int) -> list[float]:
        """The scores of the last ``limit`` scored photos of ``model_name``, oldest first (a drift window)."""
        query = (select(Inspection.score).where(Inspection.model_name == model_name, Inspection.score.is_not(None))
                 .order_by(Inspection.at.desc(), Inspection.id.desc()).limit(limit))
        with self.sessions() as session:
            return list(session.scalars(query))[::-1]

    # -- reviews and the teach-in queue ----------------------------------------------------------

    def reviewed(self, *, model_name: str | None = None) -> list[tuple[Inspection, Review]]:
        """Every reviewed inspection with its latest review (the highest id: the one recorded
        last), oldest inspection first."""
        latest = _latest_review()
        query = (select(Inspection, Review).join(Review, Review.inspection_id == Inspection.id).where(latest)
                 .order_by(Inspection.at, Inspection.id))
        if model_name is not None:
            query = query.where(Inspection.model_name == model_name)
        with self.sessions() as session:
            return [(inspection, review) for inspection, review in session.execute(query)]

    def teach_in_queue(self, model_name: str | None = None, *, stale_after: float = CLAIM_SECONDS,
                       limit: int | None = None) -> list[Review]:
        """The teach-in queue: the false alarms waiting to be taught, oldest review first, each with
        its inspection (``review.inspection``, with evidence) loaded. An inspection is in it while
        its latest review says false alarm and that review was not taught; a review an apply
        claimed less than ``stale_after`` seconds ago (being taught now) is left out. A photo
        taught once is queued again only by a new false-alarm review (after its version was
        rolled back, say)."""
        query = (select(Review).join(Inspection, Review.inspection_id == Inspection.id)
                 .where(*self._queue_filters(stale_after))
                 .order_by(Review.at, Review.id).limit(limit)
                 .options(selectinload(Review.inspection).selectinload(Inspection.evidence)))
        if model_name is not None:
            query = query.where(Inspection.model_name == model_name)
        with self.sessions() as session:
            return list(session.scalars(query))

    def claim_teach_in(self, review_ids: Sequence[int], who: str, *, stale_after: float = CLAIM_SECONDS) -> list[int]:
        """Claim queue entries for ``who``'s teach-in, in one transaction: of ``review_ids``, those
        still waiting (not taught, not claimed by another apply under way) are marked with ``who``
        and now, and returned. Two supervisors applying at once never teach one photo twice."""
        if not review_ids:
            return []
        now = utc_now()
        with self.writing_sessions.begin() as session:
            query = (select(Review).join(Inspection, Review.inspection_id == Inspection.id)
                     .where(Review.id.in_(list(review_ids)), *self._queue_filters(stale_after)).with_for_update())
            claimed = list(session.scalars(query))
            for review in claimed:
                review.taught_by, review.taught_at = who, now
            return sorted(review.id for review in claimed)

    def finish_teach_in(self, review_ids: Sequence[int], version: int) -> None:
        """Mark claimed queue entries taught: model version ``version`` learnt their photos."""
        if not review_ids:
            return
        with self.writing_sessions.begin() as session:
            session.execute(update(Review).where(Review.id.in_(list(review_ids))).values(taught_version=int(version)))

    def release_teach_in(self, review_ids: Sequence[int]) -> None:
        """Give claimed queue entries back to the queue (their teach-in failed)."""
        if not review_ids:
            return
        with self.writing_sessions.begin() as session:
            session.execute(update(Review).where(Review.id.in_(list(review_ids)), Review.taught_version.is_(None))
                            .values(taught_by=None, taught_at=None))

    @staticmethod
    def _queue_filters(stale_after: float) -> list:
        cutoff = utc_now() - dt.timedelta(seconds=stale_after)
        return [Review.verdict == "false_alarm", _latest_review(), Review.taught_version.is_(None),
                or_(Review.taught_at.is_(None), Review.taught_at < cutoff)]

    def _listing_filters(self, source, station, model_name, verdict, since, until, reviewed, min_score,
                         max_score) -> list:
        filters = self._filters(source, station, model_name, verdict, since, until)
        if reviewed is not None:
            has_review = select(Review.id).where(Review.inspection_id == Inspection.id).exists()
            filters.append(has_review if reviewed else ~has_review)
        if min_score is not None:
            filters.append(Inspection.score >= min_score)
        if max_score is not None:
            filters.append(Inspection.score <= max_score)
        return filters

    @staticmethod
    def _filters(source, station, model_name, verdict, since, until) -> list:
        filters = []
        if source is not None:
            filters.append(Inspection.source == source)
        if station is not None:
            filters.append(Inspection.station == station)
        if model_name is not None:
            filters.append(Inspection.model_name == model_name)
        if verdict is not None:
            verdicts = [verdict] if isinstance(verdict, str) else list(verdict)
            filters.append(Inspection.verdict.in_(verdicts))
        if since is not None:
            filters.append(Inspection.at >= since)
        if until is not None:
            filters.append(Inspection.at < until)
        return [and_(*filters)] if filters else []


def _latest_review():
    """Condition: ``Review`` is its inspection's latest review (no review of it has a higher id)."""
    later = aliased(Review)
    return ~select(later.id).where(later.inspection_id == Review.inspection_id, later.id > Review.id).exists()


def _reason(error: DBAPIError) -> str:
    """The driver's own message, on one line."""
    return " ".join(str(error.orig).split()) if error.orig is not None else str(error)
