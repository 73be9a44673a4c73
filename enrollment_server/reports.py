"""Attendance reports: first / last seen per person per day and site, as CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

from enrollment_server.store import DailyAttendance

COLUMNS = ("site", "person_id", "name", "day", "first_seen", "last_seen", "events")
DOOR_COLUMNS = ("site", "day", "person_id", "name", "door", "first_seen", "last_seen", "events")


def report_rows(rows: Sequence[DailyAttendance], *, by_door: bool = False) -> list[dict]:
    """JSON-ready rows; `by_door`: rows of a report by door (`Store.daily_report(by_door=True)`), with their door."""
    out = []
    for r in rows:
        row = {
            "site": r.site_id,
            "person_id": r.person_id,
            "name": r.name,
            "day": r.day.isoformat(),
            "first_seen": r.first_seen.isoformat().replace("+00:00", "Z"),
            "last_seen": r.last_seen.isoformat().replace("+00:00", "Z"),
            "events": r.events,
        }
        if by_door:
            row["door"] = r.device_id
        out.append(row)
    return out


def to_csv(rows: Sequence[DailyAttendance], *, by_door: bool = False) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=DOOR_COLUMNS if by_door else COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report_rows(rows, by_door=by_door):
        # a name starting with = + - @ would run as a formula in a spreadsheet: quote it as text
        name = row["name"] or ""
        row["name"] = "'" + name if name[:1] in ("=", "+", "-", "@") else name
        writer.writerow(row)
    return buf.getvalue()


def to_json(rows: Sequence[DailyAttendance]) -> str:
    return json.dumps(report_rows(rows), indent=2) + "\n"
