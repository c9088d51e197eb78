"""The chat page: `/` and its assets (page/: index.html, app.js, style.css, vendor/), and the
conversations API behind it (conversations.py).

Everything the page loads comes from this package: no CDN, no web fonts, nothing fetched at install
time (vendor/README.md names each library, its version and licence, and the command that fetched
it). The page is a static file: it holds no data, so it needs no key; every call it makes to the API
carries the key the user typed (Authorization: Bearer, as any client sends it), kept in the
browser's storage and never in a cookie, so another site cannot make the browser act for the page
(no CSRF). Its Content-Security-Policy lets it run only its own scripts and talk only to this
server: a model's reply that slipped past the sanitizer still could not load or send anything.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from .conversations import Conversations

PAGE = Path(__file__).with_name("page")
# Browsers run a module script only with a JavaScript type; some systems' MIME tables say otherwise.
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Page:
    def __init__(self, server, conversations_dir=None) -> None:
        self.server = server
        self.conversations = Conversations(server, conversations_dir)

    def routes(self) -> list:
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        return [Route("/", self._index, methods=["GET"]),
                Mount("/page", StaticFiles(directory=PAGE), name="page"),
                *self.conversations.routes()]

    async def _index(self, request):
        from starlette.responses import FileResponse

        return FileResponse(PAGE / "index.html", headers={
            "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"})
