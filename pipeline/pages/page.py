"""The report page as one HTML file: the data as a JSON block, one stylesheet and one script
(pipeline/pages/page.css, page.js), all inline. Its Content-Security-Policy allows exactly that
script and that stylesheet (by their sha256), images from the page itself or its folder, and
nothing from a network: whatever a file name holds, the page runs no script from data."""

from __future__ import annotations

import base64
import hashlib
import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline import atomic


def _asset(name: str) -> str:
    return resources.files("pipeline.pages").joinpath(name).read_text(encoding="utf-8")


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def json_block(value: Any) -> str:
    """JSON that cannot end its <script> block or open markup: <, > and & as \\u escapes (valid
    JSON, read back the same), and the two line separators JavaScript once treated as newlines."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def render(data: dict[str, Any]) -> str:
    style, script = _asset("page.css"), _asset("page.js")
    policy = (f"default-src 'none'; script-src {_digest(script)}; style-src {_digest(style)}; "
              "img-src 'self' data: file:; base-uri 'none'; form-action 'none'")
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
        f"<title>{html.escape(data['title'])}</title>\n"
        f"<style>{style}</style>\n</head>\n<body>\n"
        '<header><h1 id="title"></h1><p id="subtitle"></p></header>\n'
        '<nav id="toc" aria-label="sections"></nav>\n<main id="main"></main>\n'
        '<div id="preview" hidden></div>\n'
        '<noscript><p>This page builds its sections with JavaScript: open it in a browser with scripts on.</p>'
        "</noscript>\n"
        f'<script type="application/json" id="page-data">{json_block(data)}</script>\n'
        f"<script>{script}</script>\n</body>\n</html>\n"
    )


def write_page(data: dict[str, Any], out: Path) -> None:
    with atomic.replacing(out, suffix=".html") as temporary:
        Path(temporary).write_text(render(data), encoding="utf-8")
