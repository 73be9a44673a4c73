"""UTC timestamps on the wire: ISO-8601, always UTC, normalised to `YYYY-MM-DDTHH:MM:SS.ffffffZ`.

Readers accept `Z` or `+00:00` and 0-9 fractional digits (truncated to microseconds); any other offset is refused
rather than converted, because a non-UTC stamp means a misconfigured producer whose clock should be looked at.
Writing one canonical spelling makes payloads byte-stable (golden files, signatures over manifests).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

_TS = re.compile(r"(?P<date>\d{4}-\d{2}-\d{2})T(?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9}))?(?P<tz>Z|\+00:00)")


def format_utc(moment: datetime) -> str:
    """The canonical spelling of an aware datetime (converted to UTC)."""
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no time zone; pass an aware one (timezone.utc)")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_now() -> str:
    return format_utc(datetime.now(timezone.utc))


def parse_utc(value: str) -> datetime:
    """Parse a wire timestamp; raise ValueError (callers turn it into a typed error naming the field)."""
    m = _TS.fullmatch(value)
    if not m:
        raise ValueError(f"{value!r} is not a UTC ISO-8601 timestamp (YYYY-MM-DDTHH:MM:SS[.fff]Z or +00:00)")
    frac = (m["frac"] or "").ljust(6, "0")[:6]
    # strptime validates the calendar (month 13, February 30 and hour 24 are refused)
    naive = datetime.strptime(f"{m['date']}T{m['time']}.{frac}", "%Y-%m-%dT%H:%M:%S.%f")
    return naive.replace(tzinfo=timezone.utc)


def normalise_utc(value: str) -> str:
    return format_utc(parse_utc(value))
