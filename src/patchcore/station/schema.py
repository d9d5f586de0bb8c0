"""The history database's tables (SQLAlchemy 2 declarative models): one row per verdict, the
evidence crops written for it, and the reviews people give it.

Tables
------

``inspections``: one photo scored (or found unreadable) by ``patchcore watch`` or by the service.

======================  ====================================================================
``id``                  key
``at``                  when the verdict was made (UTC)
``source``              ``watch`` or ``service``
``station``             which station or line (host name by default; ``watch --station``)
``photo_path``          where the photo lay when it was taken (watch: absolute path in the
                        inbox; service: the upload's file name)
``photo_sha256``        SHA-256 of the photo's bytes
``stored_path``         where ``watch`` moved the photo afterwards (``--sort``, ``rejected/``), or
                        NULL while it stays where it was
``model_name``          the model's folder name (service: the name it is served under)
``model_version``       the model directory's version (``manifest["version"]``)
``model_sha256``        SHA-256 of the model's manifest: the exact version
``score``               image anomaly score; NULL for an unreadable photo
``verdict``             ``ok``, ``ng`` (at or above the threshold), ``unrated`` (the model has no
                        threshold) or ``error`` (unreadable)
``threshold``           the model's image threshold then, and ``pixel_threshold``
``timings``             JSON: milliseconds per stage (``backbone``, ``search``, ``map``, ...)
``overlay_path``        heat-map overlay written for it (NULL: none; the service writes none)
``mask_path``           defect mask written for it (with a pixel threshold)
``error``               why the photo could not be read (NULL otherwise)
======================  ====================================================================

``watch`` never scores the same bytes under the same path twice: a unique index on
``(station, photo_path, photo_sha256)`` over the rows with source ``watch`` guards it (the
station is part of the key: two lines sharing a database may both have a ``/srv/inbox/1.png``).

``evidence_crops``: for an inspection, each of its most anomalous patches (``rank`` 1, 2, ...)
with the crop written for it (the patch beside its nearest normal training patch), the distance,
and where the patches lie. ``reviews``: a person's judgement of an inspection (``false_alarm`` or
``confirmed_defect``), who gave it and when; an inspection may collect several, and the latest
counts. ``who`` is the name a teach-in token is filed under when the review came with one
(``who_verified`` true), else the name the reviewer typed, as given. A false alarm waits in the
teach-in queue until a supervisor applies it: ``taught_by`` and ``taught_at`` are set when an apply
claims it, ``taught_version`` when the model version that learnt the photo is written.

Changes to these tables need a new Alembic migration in ``migrations/versions``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import (JSON, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text,
                        false, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

#: Where a verdict came from.
SOURCES = ("watch", "service")
#: What an inspection concluded.
VERDICTS = ("ok", "ng", "unrated", "error")
#: What a reviewer may say of an inspection.
REVIEW_VERDICTS = ("false_alarm", "confirmed_defect")

#: Alembic's table of the schema revision, kept apart from any other application's in a shared database.
VERSION_TABLE = "patchcore_history_version"
#: Names of constraints and indexes, the same on every database (migrations refer to them).
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp stored in UTC and read back as an aware UTC datetime (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[dt.datetime], dialect) -> Optional[dt.datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value} has no time zone; give it in UTC")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: Optional[dt.datetime], dialect) -> Optional[dt.datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Inspection(Base):
    """One verdict: a photo scored (or found unreadable), by which model, with what result."""

    __tablename__ = "inspections"
    __table_args__ = (
        CheckConstraint(_one_of("source", SOURCES), name="source"),
        CheckConstraint(_one_of("verdict", VERDICTS), name="verdict"),
        Index("ix_inspections_at", "at"),
        Index("ix_inspections_model_name_at", "model_name", "at"),
        Index("ix_inspections_verdict_at", "verdict", "at"),
        # Exactly once per photo for watch: the same bytes under the same path of one station are one row.
        Index("uq_inspections_watched_photo", "station", "photo_path", "photo_sha256", unique=True,
              sqlite_where=text("source = 'watch'"), postgresql_where=text("source = 'watch'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)
    source: Mapped[str] = mapped_column(String(16))
    station: Mapped[str] = mapped_column(String(255), default="")
    photo_path: Mapped[str] = mapped_column(Text)
    photo_sha256: Mapped[str] = mapped_column(String(64))
    stored_path: Mapped[Optional[str]] = mapped_column(Text, default=None)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[int] = mapped_column(Integer)
    model_sha256: Mapped[str] = mapped_column(String(64))
    score: Mapped[Optional[float]] = mapped_column(Float, default=None)
    verdict: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[Optional[float]] = mapped_column(Float, default=None)
    pixel_threshold: Mapped[Optional[float]] = mapped_column(Float, default=None)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    overlay_path: Mapped[Optional[str]] = mapped_column(Text, default=None)
    mask_path: Mapped[Optional[str]] = mapped_column(Text, default=None)
    error: Mapped[Optional[str]] = mapped_column(Text, default=None)

    evidence: Mapped[list["EvidenceCrop"]] = relationship(
        back_populates="inspection", cascade="all, delete-orphan", order_by="EvidenceCrop.rank")
    reviews: Mapped[list["Review"]] = relationship(
        back_populates="inspection", cascade="all, delete-orphan", order_by="Review.at")

    def __repr__(self) -> str:
        return (f"Inspection(id={self.id}, source={self.source!r}, photo_path={self.photo_path!r}, "
                f"score={self.score}, verdict={self.verdict!r})")


class EvidenceCrop(Base):
    """One anomalous patch of an inspection beside its nearest normal patch of the training images."""

    __tablename__ = "evidence_crops"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    #: 1 for the most anomalous patch, 2 for the next, ...
    rank: Mapped[int] = mapped_column(Integer)
    #: The crop written (the patch beside the normal patch); NULL when none was written.
    picture_path: Mapped[Optional[str]] = mapped_column(Text, default=None)
    distance: Mapped[float] = mapped_column(Float)
    #: The patch's box in the photo (left, top, right, bottom), and the training patch's.
    box: Mapped[list[int]] = mapped_column(JSON)
    training_image: Mapped[str] = mapped_column(Text)
    training_box: Mapped[Optional[list[int]]] = mapped_column(JSON, default=None)

    inspection: Mapped[Inspection] = relationship(back_populates="evidence")


class Review(Base):
    """A person's judgement of an inspection's verdict."""

    __tablename__ = "reviews"
    __table_args__ = (CheckConstraint(_one_of("verdict", REVIEW_VERDICTS), name="verdict"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    verdict: Mapped[str] = mapped_column(String(32))
    who: Mapped[str] = mapped_column(String(255))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utc_now)
    note: Mapped[Optional[str]] = mapped_column(Text, default=None)
    #: ``who`` is a teach-in token's name (the request carried that token), not a name as typed.
    who_verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: The teach-in of a false alarm: the supervisor who applied it and when (set on claiming it),
    #: and the model version written with the photo (NULL until written).
    taught_by: Mapped[Optional[str]] = mapped_column(String(255), default=None)
    taught_at: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime, default=None)
    taught_version: Mapped[Optional[int]] = mapped_column(Integer, default=None)

    inspection: Mapped[Inspection] = relationship(back_populates="reviews")
