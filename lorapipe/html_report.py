"""Self-contained HTML for the dashboard: inline styles, no scripts, no external URL.

The ZenML dashboard shows an HTML visualization in a sandboxed frame that runs no scripts and (offline) loads
nothing from the network, so every page here is plain HTML with one inline stylesheet; long text wraps, wide tables
scroll inside their box. Images are embedded as data URIs.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any, Iterable, Optional, Sequence

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1f2328;margin:16px;max-width:1360px}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:20px 0 6px}
p{margin:4px 0}.muted{color:#59636e}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.box{overflow-x:auto;margin:6px 0}
table{border-collapse:collapse;min-width:40%}
th,td{border:1px solid #d1d9e0;padding:4px 8px;text-align:left;vertical-align:top;
      white-space:pre-wrap;overflow-wrap:break-word;max-width:560px}
td.keep{white-space:nowrap}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{background:#f6f8fa;padding:0 3px;border-radius:3px;overflow-wrap:anywhere}
img{max-width:100%}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers compact and aligned; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def status(ok: Optional[bool], yes: str = "passed", no: str = "FAILED") -> str:
    if ok is None:
        return '<span class="muted">—</span>'
    return f'<span class="ok">{esc(yes)}</span>' if ok else f'<span class="bad">{esc(no)}</span>'


def table(headers: Optional[Sequence[str]], rows: Iterable[Sequence[Any]], raw_columns: Sequence[int] = (),
          keep_columns: Sequence[int] = ()) -> str:
    """A table (no header row when `headers` is None); cells are escaped except in `raw_columns` (already HTML,
    e.g. from `status`); `keep_columns` (short codes, file:line) never wrap."""
    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i in raw_columns:
                cells.append(f"<td>{cell}</td>")
            elif i in keep_columns:
                cells.append(f'<td class="keep">{esc(fmt(cell))}</td>')
            else:
                cells.append(_cell(cell))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="box"><table>{head}<tbody>{"".join(body)}</tbody></table></div>'


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{esc(fmt(value))}</td>' if numeric else f"<td>{esc(fmt(value))}</td>"


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of labelled values; the labels are header cells."""
    rows = "".join(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in pairs)
    return f'<div class="box"><table><tbody>{rows}</tbody></table></div>'


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def page(title: str, *sections: str) -> str:
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1>{''.join(sections)}</body></html>")


def section(title: str, *parts: str) -> str:
    return f"<h2>{esc(title)}</h2>{''.join(parts)}"


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{css}">{esc(text)}</p>' if css else f"<p>{esc(text)}</p>"


def code(text: str) -> str:
    """Preformatted text (a config fragment, a command)."""
    return f"<pre>{esc(text)}</pre>"
