"""The web console's pages, served by `enrollment-server serve` on the admin API's port (under /console).

- `/console/login`: the admin token is typed into a form posted to `/console/login` (never a query string, never in
  a URL), exchanged for a session cookie (enrollment_server/auth.py); `/console/logout` ends it.
- `/console/people`, `/console/unknown`, `/console/attendance`, `/console/doors`: one HTML shell each (the page's
  script draws it from the /api/v1 routes); a request without a session is sent to the login page.
- `/console/static/<file>`: the pages' CSS, JavaScript and icons, shipped in this package (no CDN, no build step:
  the console works on a site without internet).

Every response carries a strict Content-Security-Policy (scripts, styles and images from this server only, no
inline script, no framing), `Referrer-Policy: same-origin` (no console URL leaves the site; within it the browser
keeps sending its real `Origin`, which the CSRF check reads: under `no-referrer` a form post says `Origin: null`) and
`X-Content-Type-Options: nosniff`; pages are not cached.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from importlib import resources
from string import Template
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from enrollment_server.api import ApiContext
from enrollment_server.auth import CSRF_HEADER, SESSION_COOKIE, AuthError, CsrfError, TooManyLoginsError, check_origin

log = logging.getLogger(__name__)

PREFIX = "/console"
# page -> (title, script): each page's script draws its content into the shell
PAGES = {
    "people": "People",
    "unknown": "Unknown visitors",
    "attendance": "Attendance",
    "doors": "Doors",
}
HOME = f"{PREFIX}/people"
STATIC = resources.files("enrollment_server.console") / "static"
_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def _template(name: str) -> Template:
    return Template((STATIC / name).read_text(encoding="utf-8"))


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every asset, read once at start-up: only these names are ever served (no path from a request is opened)."""
    out = {}
    for entry in STATIC.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


def _page(body: str, status: int = 200) -> Response:
    return Response(
        body,
        status_code=status,
        media_type="text/html; charset=utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


def _redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def console_pages(*, default_site: str) -> Callable[[ApiContext], APIRouter]:
    """The router factory `create_app(routers=...)` takes."""
    login_page = _template("login.html")
    shell = _template("shell.html")
    assets = _static_files()

    def make(ctx: ApiContext) -> APIRouter:
        auth = ctx.auth
        router = APIRouter(prefix=PREFIX, include_in_schema=False)

        def login_form(error: str = "", status: int = 200) -> Response:
            notice = f'<p class="login-error" role="alert">{html.escape(error)}</p>' if error else ""
            return _page(login_page.substitute(error=notice), status)

        @router.get("")
        def home(request: Request) -> Response:
            return _redirect(HOME if auth.session(request.cookies.get(SESSION_COOKIE)) else f"{PREFIX}/login")

        @router.get("/login")
        def login(request: Request) -> Response:
            if auth.session(request.cookies.get(SESSION_COOKIE)):
                return _redirect(HOME)
            return login_form()

        @router.post("/login")
        async def do_login(request: Request) -> Response:
            try:
                check_origin(request)
                form = await request.form()
                token = form.get("token")
                await form.close()
                cookie, _session = auth.login(token if isinstance(token, str) else "", _client(request))
            except CsrfError:
                return login_form("This login form was posted from another site: open the console directly.", 403)
            except TooManyLoginsError as exc:
                return login_form(str(exc).capitalize() + ".", 429)
            except AuthError:
                return login_form("That is not the admin token.", 401)
            response = _redirect(HOME)
            auth.set_cookie(response, cookie, request)
            return response

        @router.post("/logout")
        async def do_logout(request: Request) -> Response:
            cookie = request.cookies.get(SESSION_COOKIE)
            session = auth.session(cookie)
            if session is not None:
                check_origin(request)
                form = await request.form()
                given = request.headers.get(CSRF_HEADER) or form.get("csrf") or ""
                await form.close()
                if given != session.csrf:
                    raise CsrfError("logout without this session's CSRF token")
                auth.logout(cookie)
                log.info("console: logout from %s", _client(request))
            response = _redirect(f"{PREFIX}/login")
            response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
            return response

        @router.get("/static/{name}")
        def static(name: str) -> Response:
            if name not in assets:
                return Response("not found", status_code=404, media_type="text/plain")
            data, kind = assets[name]
            return Response(data, media_type=kind, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

        def page(name: str) -> Callable[[Request], Response]:
            def serve(request: Request) -> Response:
                session = auth.session(request.cookies.get(SESSION_COOKIE))
                if session is None:
                    return _redirect(f"{PREFIX}/login")
                body = shell.substitute(
                    page=name,
                    title=html.escape(PAGES[name]),
                    csrf=html.escape(session.csrf),
                    site=html.escape(quote(default_site, safe="")),
                )
                return _page(body)

            return serve

        for name in PAGES:
            router.add_api_route(f"/{name}", page(name), methods=["GET"], name=f"console_{name}")
        return router

    return make
