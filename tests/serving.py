"""A `qwen35 serve` Server for the tests, in this process on 127.0.0.1:0, stopped as `serve` stops it
(the HTTP thread first, then the worker and its queue)."""

from __future__ import annotations

from contextlib import contextmanager

from qwen35.runtime.frontends.server import Server, http_port, listen


@contextmanager
def running(session, **options):
    """Server(session, **options) listening on a free port; its address in `.base_url`."""
    srv = Server(session, **options)
    http = listen(srv, "127.0.0.1", 0)
    srv.base_url = f"http://127.0.0.1:{http_port(http)}"
    try:
        yield srv
    finally:
        http.should_exit = True
        http.thread.join(10)
        srv.close()
