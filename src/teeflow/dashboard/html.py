"""Server-rendered HTML with every value escaped: `Markup` is text already safe to send,
anything else passes through `e` (html.escape, quotes too) on its way into a page.

Every value a page shows comes from a peer (the scheduler, the initiator's spec, an owner's
catalog): none may add markup, a script or an attribute, so nothing is ever interpolated
without `e` or `fmt`.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any


class Markup(str):
    """HTML built here from escaped parts: safe to put in a page as it is."""

    def __add__(self, other: str) -> Markup:
        return Markup(str.__add__(self, e(other)))


def e(value: Any) -> Markup:
    """`value` as HTML text: escaped, unless it is Markup already."""
    if isinstance(value, Markup):
        return value
    return Markup(escape("" if value is None else str(value), quote=True))


def fmt(template: str, *args: Any, **kwargs: Any) -> Markup:
    """`template` (HTML written here, never a peer's) with each argument escaped."""
    return Markup(template.format(*(e(a) for a in args),
                                  **{k: e(v) for k, v in kwargs.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    return Markup(sep.join(e(p) for p in parts))


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "") -> Markup:
    head = join(fmt("<th>{}</th>", h) for h in headers)
    body = join(fmt("<tr>{}</tr>", join(fmt("<td>{}</td>", c) for c in row)) for row in rows)
    return fmt('<table class="{}"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>',
               cls, head, body)


def link(href: str, text: Any) -> Markup:
    return fmt('<a href="{}">{}</a>', href, text)


def lines(items: Iterable[Any]) -> Markup:
    """Plain text lines, one after another, in a <pre>."""
    return fmt("<pre>{}</pre>", "\n".join(str(i) for i in items))


STYLE = """
body{font-family:sans-serif;margin:0;color:#222}
nav{background:#234;padding:.5em 1em}nav a{color:#fff;margin-right:1.2em;text-decoration:none}
main{padding:1em 2em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee}pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}
.ok{color:#060}.bad{color:#a00}.warn{color:#a60}.who{font-size:90%;color:#555}
button{padding:.3em 1em;margin-right:.5em}
"""

NAV = (("/", "tasks"), ("/approvals", "approvals"), ("/submit", "submit"),
       ("/datasets", "datasets"), ("/executors", "executors"), ("/audit", "audit log"))


def page(title: str, body: Markup, whoami: str, live: str | None = None) -> str:
    """A whole page; a `live` one (the version of the facts it shows) reloads itself when
    the tasks or the log change from that version."""
    nav = join(link(href, text) for href, text in NAV)
    script = fmt('<script src="/live.js" data-version="{}"></script>', live) \
        if live is not None else Markup("")
    return fmt('<!doctype html><html><head><meta charset="utf-8"><title>{} - teeflow'
               '</title><style>{}</style></head><body><nav>{}<span class="who" '
               'style="color:#ccc">{}</span></nav><main><h1>{}</h1>{}</main>{}</body></html>',
               title, Markup(STYLE), nav, whoami, title, body, script)


# Polls /live and reloads when the version differs from the page's own (taken as it was
# made, so a change while it loads is not missed); served as a file of this origin (the
# page's CSP allows scripts from 'self' only, never inline ones).
LIVE_JS = """
(function(){
  var me = document.currentScript;
  var seen = me ? me.getAttribute('data-version') : null;
  function poll(){
    fetch('/live', {credentials: 'same-origin', cache: 'no-store'})
      .then(function(r){ return r.ok ? r.json() : null; })
      .then(function(d){
        if (!d) return;
        if (seen !== null && d.version !== seen) { location.reload(); return; }
        seen = d.version;
      }).catch(function(){})
      .finally(function(){ setTimeout(poll, 1500); });
  }
  poll();
})();
"""
