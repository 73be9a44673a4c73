"""Who may use the admin API and the console: the holder of the admin token, by bearer header or by a console session.

- API clients send `Authorization: Bearer <token>` on every request (compared in constant time, as digests).
- The console's login page posts the token once (a form field, never a URL) and gets a session cookie:
  random (256 bits), `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends it), `Secure`
  when the request came over HTTPS, `Path=/`. Sessions live in this process's memory for `console.session_hours`
  (a server restart logs everybody out; logging out ends the session at once); only their SHA-256 is kept.
- Cross-site request forgery: a request authenticated by the cookie that changes anything (any method but GET,
  HEAD, OPTIONS) must carry the session's CSRF token in `X-CSRF-Token` (the console's pages hold it in a meta tag;
  a page of another origin can neither read it nor send the cookie), and its `Origin`, when the browser sends one,
  must be this server's own. The login form is checked the same way (no logging a victim into the attacker's
  session).
- Guessing: failed logins are counted per client address; past `MAX_FAILED_LOGINS` within `FAILED_LOGIN_WINDOW_S`
  the address is refused (429) until the window has passed. The token itself is long (>= 16 characters).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from models.errors import FaceAttendError

log = logging.getLogger(__name__)

SESSION_COOKIE = "faceattend_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FAILED_LOGINS = 10
FAILED_LOGIN_WINDOW_S = 300.0
MAX_SESSIONS = 1000  # oldest go first past this: a flood of logins cannot grow memory without bound


class AuthError(FaceAttendError):
    """No bearer token or session, or a wrong one (401)."""

    def __init__(self, message: str, *, invalid_token: bool) -> None:
        super().__init__(message)
        # RFC 6750: a presented but wrong token is error="invalid_token"; a missing one gets the bare challenge
        self.challenge = 'Bearer realm="faceattend"' + (', error="invalid_token"' if invalid_token else "")


class CsrfError(FaceAttendError):
    """A cookie-authenticated change without this session's CSRF token, or from another origin (403)."""


class TooManyLoginsError(FaceAttendError):
    """Too many failed logins from one address (429)."""


@dataclass(frozen=True)
class Session:
    csrf: str
    expires: float  # time.monotonic()


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class AdminAuth:
    def __init__(self, token: str, *, session_ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._expected = _digest(token)
        self._ttl = session_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[bytes, Session] = {}
        self._failures: dict[str, deque[float]] = {}

    # -- the token ---------------------------------------------------------------------------------------------

    def token_matches(self, given: str) -> bool:
        # digests, so that neither the token's value nor its length shows in the comparison's timing
        return hmac.compare_digest(_digest(given), self._expected)

    # -- sessions ----------------------------------------------------------------------------------------------

    def login(self, given: str, client: str) -> tuple[str, Session]:
        """A new session for the right token: (cookie value, session). AuthError / TooManyLoginsError otherwise."""
        now = self._clock()
        with self._lock:
            recent = self._failures.setdefault(client, deque())
            while recent and now - recent[0] > FAILED_LOGIN_WINDOW_S:
                recent.popleft()
            if len(recent) >= MAX_FAILED_LOGINS:
                raise TooManyLoginsError(f"too many failed logins from {client}: try again in a few minutes")
        if not self.token_matches(given):
            with self._lock:
                self._failures[client].append(now)
            log.warning("console: failed login from %s", client)
            raise AuthError("wrong admin token", invalid_token=True)
        cookie = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), expires=now + self._ttl)
        with self._lock:
            self._failures.pop(client, None)
            self._drop_expired(now)
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[_digest(cookie)] = session
        log.info("console: login from %s", client)
        return cookie, session

    def session(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        now = self._clock()
        key = _digest(cookie)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None and session.expires <= now:
                del self._sessions[key]
                return None
        return session

    def logout(self, cookie: str | None) -> None:
        if cookie:
            with self._lock:
                self._sessions.pop(_digest(cookie), None)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]

    # -- requests ----------------------------------------------------------------------------------------------

    def authenticate(self, request: Request, bearer: str | None) -> None:
        """Raise unless the request carries the token or a live session (with CSRF proof for a change)."""
        if bearer is not None:
            if not self.token_matches(bearer):
                raise AuthError("invalid bearer token", invalid_token=True)
            return
        session = self.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise AuthError(
                "missing bearer token (Authorization: Bearer <token>) or console session", invalid_token=False
            )
        if request.method not in SAFE_METHODS:
            check_origin(request)
            given = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(given.encode(), session.csrf.encode()):
                raise CsrfError(f"missing or wrong {CSRF_HEADER} header for this console session")

    def set_cookie(self, response: Response, cookie: str, request: Request) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=int(self._ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


def check_origin(request: Request) -> None:
    """A browser's `Origin` (sent with every POST) must be this server's own (`null`, an origin the browser will not
    disclose, is refused too); requests without one (non-browser clients) pass, they carry no victim's cookie."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin != own:
        raise CsrfError(f"request from origin {origin!r} refused (this console is {own!r})")
