"""The audit log: every measurement, command, ack, alarm and mode change, durably recorded in
SQLite (WAL) as it happens, by every process of a session (each writes its own rows).

A row is committed before the process acts on it or answers it, so killing a process loses
nothing it had acknowledged. ``synchronous=FULL``: a committed row survives a power cut too.

    mpc-dose log export audit.sqlite --out session.csv
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path

from .protocol.codec import Envelope

__all__ = ["AuditLog", "export_csv"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t_wall REAL NOT NULL,          -- UTC seconds when recorded
    t_sim REAL,                    -- simulation seconds, in simulated runs
    process TEXT NOT NULL,         -- who recorded it (controller, plant, pump-bridge)
    direction TEXT NOT NULL,       -- in, out, or note
    kind TEXT NOT NULL,            -- message type, or mode / note
    src TEXT, epoch TEXT, seq INTEGER,
    body TEXT NOT NULL             -- JSON
);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind);
"""


class AuditLog:
    """Append-only rows in *path*, written by *process*."""

    def __init__(self, path: str | Path, process: str) -> None:
        self.path, self.process = Path(path), process
        self.db = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def message(self, direction: str, envelope: Envelope) -> None:
        """Record one protocol message (with its envelope) going *direction* (in/out)."""
        m = envelope.message
        self._write(envelope.t_sim, direction, m.type, envelope.src, envelope.epoch,
                    envelope.seq, m.body())

    def note(self, kind: str, t_sim: float | None = None, **fields) -> None:
        """A mode change, transition or anything else worth keeping, as *kind*."""
        self._write(t_sim, "note", kind, None, None, None, fields)

    def _write(self, t_sim, direction, kind, src, epoch, seq, body) -> None:
        self.db.execute("INSERT INTO events (t_wall, t_sim, process, direction, kind, src, "
                        "epoch, seq, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (time.time(), t_sim, self.process, direction, kind, src, epoch, seq,
                         json.dumps(body, default=str, allow_nan=False)))

    def rows(self, kind: str | None = None) -> list[dict]:
        query = "SELECT * FROM events" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        cursor = self.db.execute(query, (kind,) if kind else ())
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def close(self) -> None:
        self.db.close()


def export_csv(path: str | Path, out: str | Path, *, process: str | None = None) -> int:
    """Write the log at *path* (optionally one process's rows) to CSV; returns the rows."""
    if not Path(path).exists():
        from .errors import ConfigError

        raise ConfigError(f"log export: no audit log at {str(path)!r}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    query = "SELECT * FROM events" + (" WHERE process = ?" if process else "") + " ORDER BY id"
    cursor = db.execute(query, (process,) if process else ())
    names = [d[0] for d in cursor.description]
    count = 0
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for row in cursor:
            writer.writerow(row)
            count += 1
    db.close()
    return count
