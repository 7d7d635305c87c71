"""Saved EIA v2 response bodies as a source: ``outbox fetch --replay DIR``.

:class:`ReplaySource` hands over every ``*.json`` body under a directory, in sorted path
order, as the :class:`~outbox.ports.Page` the live API would have given: the route from
the body's ``request.command``, the api_key stripped, the same body checks as a live page
(:mod:`outbox.sources.eia`). A saved EIA error or a malformed body is a
:class:`~outbox.errors.SourceFatalError` naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from outbox.errors import SourceFatalError
from outbox.ports import ROUTES, Page, Request
from outbox.redact import redact
from outbox.sources.eia import (
    MAX_PAGE_LENGTH,
    as_int,
    check_size,
    error_of,
    parse_body,
    strip_api_key,
)

_COMMAND = re.compile(r"^/v2/(?P<route>.+?)/data/?$")


class ReplaySource:
    """The saved response bodies under ``directory`` (a :class:`~outbox.ports.Source`)."""

    saved = True  # holds its pages: the fetch stage plans no requests

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def iter_pages(self, request: Request | None = None) -> Iterator[Page]:
        """Every saved page (``request`` must be None: a replay answers no request)."""
        if request is not None:
            raise ValueError("a replay directory answers no request: iter_pages(None)")
        return iter_replay_pages(self.directory)


def iter_replay_pages(directory: Path) -> Iterator[Page]:
    """Yield saved EIA v2 response bodies (``*.json`` under ``directory``, by sorted path).

    The route comes from each body's ``request.command``; ``*.http-meta.json`` files are
    skipped. ``page_no`` is the file's index; a page is ``last`` when its offset plus its
    rows reach its ``total`` (a whole saved request is one such file).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceFatalError(f"replay directory {directory} does not exist")
    files = [p for p in directory.rglob("*.json") if not p.name.endswith(".http-meta.json")]
    files.sort(key=lambda p: p.relative_to(directory).as_posix())
    for page_no, path in enumerate(files):
        yield read_replay_page(path, page_no)


def read_replay_page(path: Path, page_no: int = 0) -> Page:
    """One saved response body as a :class:`Page`; SourceFatalError naming the file."""
    where = f"replay file {path}"
    try:
        check_size(path.stat().st_size, lambda cause: f"{where}: {cause}")
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SourceFatalError(f"{where}: not valid JSON/UTF-8: {exc}") from None
    except OSError as exc:
        raise SourceFatalError(f"{where}: cannot be read: {exc}") from None
    route = route_of_command(doc)
    if route is None:
        raise SourceFatalError(f"{where}: no request.command naming an EIA-930 route")
    error = error_of(doc)
    if error is not None:
        label = "" if error[0] is None else f" {error[0]}"
        raise SourceFatalError(redact(f"{where}: a saved EIA error{label}, not data: {error[1]}"))
    rows, total = parse_body(doc, where)
    params = strip_api_key(doc)
    offset = as_int(params.get("offset")) or 0
    if len(rows) > MAX_PAGE_LENGTH:
        raise SourceFatalError(
            f"{where}: {len(rows)} rows on one page, more than EIA's {MAX_PAGE_LENGTH}"
        )
    if offset + len(rows) > total:
        raise SourceFatalError(
            f"{where}: offset {offset} + {len(rows)} rows is more than response.total {total}"
        )
    return Page(
        route=route,
        page_no=page_no,
        offset=offset,
        total=total,
        rows=rows,
        body=orjson.dumps(doc),
        params=params,
        url=path.resolve().as_uri(),
        last=offset + len(rows) >= total,
    )


def route_of_command(doc: Any) -> str | None:
    """The route of ``request.command`` (``/v2/<route>/data/``) if it is a known one."""
    request = doc.get("request") if isinstance(doc, dict) else None
    command = request.get("command") if isinstance(request, dict) else None
    match = _COMMAND.match(command) if isinstance(command, str) else None
    route = match.group("route") if match else None
    return route if route in ROUTES else None
