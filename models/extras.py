"""The optional dependency groups ("extras") of the faceattend distribution, checked where a command starts, so a
door or a server installed without its extra gets one sentence naming what to install, not a traceback from deep
inside an import. The groups mirror pyproject.toml's [project.optional-dependencies] (a test keeps them in step)."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from typing import Final

from models.errors import MissingExtraError

# import names (not distribution names) of each extra's packages
EXTRAS: Final[dict[str, tuple[str, ...]]] = {
    "edge": ("hnswlib",),
    "server": ("sqlalchemy", "psycopg", "fastapi", "starlette", "pydantic", "multipart", "uvicorn", "scipy"),
}


def distribution_version() -> str:
    """The installed faceattend's version (the edge agent's and the server's version string)."""
    try:
        return metadata.version("faceattend")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def missing(extra: str) -> list[str]:
    """The packages of `extra` that cannot be imported here."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, who: str) -> None:
    """Raise MissingExtraError when `extra` is not fully installed; `who` names what needs it."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{who} needs the '{extra}' extra ({', '.join(absent)} not installed): pip install 'faceattend[{extra}]'"
        )
