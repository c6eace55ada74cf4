"""The report page: plain HTML and inline CSS, images as base64 data URIs, no script: it opens offline, from
a mail attachment or a laptop with no network, and shows the same thing everywhere."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

GENERATOR = "foundation report"  # <meta name="generator">: the mark of a page of ours

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 1.5em 3em; color: #222; }
header { border-bottom: 2px solid #345; margin-bottom: 1em; }
nav { font-size: 0.9em; margin-bottom: 1.5em; } nav a { margin-right: 1em; }
section { margin: 2em 0; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
th { background: #f3f5f8; text-align: left; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


@dataclass(frozen=True)
class Picture:
    """A PNG shown in the page and also written as ``report/<name>``."""

    name: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class Section:
    """One part of the page; ``note`` says what it shows, or why it is empty."""

    id: str
    title: str
    note: str = ""
    pictures: tuple[Picture, ...] = ()
    table: tuple[tuple[str, ...], ...] = field(default_factory=tuple)  # first row: header
    pre: str | None = None


def _table(rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _facts(facts: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    return f"<table>{rows}</table>"


def _picture(p: Picture) -> str:
    data = base64.b64encode(p.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(p.caption, quote=True)}" '
        f'data-name="{html.escape(p.name, quote=True)}"><figcaption>{html.escape(p.caption)}</figcaption></figure>'
    )


def render_page(title: str, facts: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    """The whole page as one string."""
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    parts = []
    for s in sections:
        body = [f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>']
        if s.note:
            body.append(f'<p class="note">{html.escape(s.note)}</p>')
        body += [_picture(p) for p in s.pictures]
        body.append(_table(s.table))
        if s.pre is not None:
            body.append(f"<pre>{html.escape(s.pre)}</pre>")
        parts.append("".join(body) + "</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="generator" content="{GENERATOR}"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><header><h1>{html.escape(title)}</h1>"
        f"{_facts(facts)}</header><nav>{nav}</nav>{''.join(parts)}</body></html>\n"
    )
