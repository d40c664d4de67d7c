"""Security headers on every response (a pure ASGI middleware: streamed videos pass untouched).

- ``nosniff``: a blob served as ``video/mp4`` is never run as a script or page;
- ``Referrer-Policy: no-referrer``: an attendee's link carries its token in the
  path, which must not leave in a Referer header (the video redirects to storage);
- ``frame-ancestors 'none'`` / ``X-Frame-Options``: no page can be framed
  (clickjacking the Start or Delete buttons);
- a Content-Security-Policy that allows only this origin's script files (no
  inline code, so injected markup cannot run) and styles (plus storage over https
  for media), except on the API docs pages, whose Swagger and ReDoc bundles come
  from a CDN;
- ``X-Robots-Tag: noindex``: an attendee's link posted somewhere public must not
  put their video in a search engine;
- HTML is ``no-store``: a shared tablet's back button does not show an attendee's
  name and email after logout;
- HSTS when the booth's public URL is https: a browser that saw the booth once never
  sends an attendee's link over plain http again.
"""

from __future__ import annotations

from typing import Any

CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",  # the pages' scripts are files in /static: no inline code
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: https:",
        "media-src 'self' https:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
DOCS_PATHS = ("/docs", "/redoc")
_ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"x-robots-tag", b"noindex, nofollow"),
)


HSTS = (b"strict-transport-security", b"max-age=31536000")


class SecurityHeaders:
    def __init__(self, app: Any, *, https: bool = False) -> None:
        self.app = app
        self.always = (*_ALWAYS, HSTS) if https else _ALWAYS

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope.get("path", "").startswith(DOCS_PATHS)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                extra = list(self.always)
                if not docs:
                    extra.append((b"content-security-policy", CSP.encode()))
                content_type = dict(headers).get(b"content-type", b"")
                if content_type.startswith(b"text/html"):
                    extra.append((b"cache-control", b"no-store"))
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
