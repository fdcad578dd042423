"""report.html: one self-contained page (figures embedded as base64) for a data officer.

Headline numbers first, then each figure with a short "how to read it", then the most vulnerable
patients. A tiny inline script marks every figure that decoded (`data-loaded`) and writes
"figures loaded: k/n" into the page, so a headless browser can check that nothing is broken.
"""

import base64
import html
from pathlib import Path

import numpy as np

from medleak.io_utils import write_text

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.headline{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;border-radius:6px;padding:.7em 1em;min-width:200px}
.card b{font-size:1.5em;display:block}.howto{background:#f7f9fc;border-left:4px solid #4a7bd0;padding:.5em 1em;font-size:.92em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}.warn{color:#a33}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.figure'), ok = 0;
  imgs.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { ok++; img.setAttribute('data-loaded', 'yes'); } });
  document.getElementById('figure-status').textContent = 'figures loaded: ' + ok + '/' + imgs.length;
});
"""


def embed_png(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def table_html(df, float_format="{:.3f}", max_rows=None) -> str:
    df = df if max_rows is None else df.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, row in df.iterrows():
        cells = []
        for value in row:
            if isinstance(value, (float, np.floating)):
                text = float_format.format(value) if np.isfinite(value) else "–"
            else:
                text = str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def figure_html(path, caption, howto) -> str:
    return (f'<figure><img class="figure" alt="{html.escape(caption)}" src="{embed_png(path)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure><div class=\"howto\"><b>How to read it.</b> {howto}</div>")


def write_report(path, *, dataset, headline, sections, notes=()):
    """Writes the page. headline: [(label, value, explanation)]; sections: [(title, html)]."""
    cards = "".join(f'<div class="card">{html.escape(label)}<b>{html.escape(value)}</b><small>{html.escape(expl)}</small></div>'
                    for label, value, expl in headline)
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    note_html = "".join(f'<p class="warn">{html.escape(n)}</p>' for n in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medleak privacy audit: {html.escape(dataset)}</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body><h1>Patient-level privacy audit: {html.escape(dataset)}</h1>
<p>This report estimates, for every training image and every patient, how well an attacker who
holds the released model could tell that they were in its training data (membership inference).
An attack AUC of 0.5 means the attacker cannot tell (no leak); 1.0 means they can always tell.</p>
<p id="figure-status">figures loaded: not checked (JavaScript disabled)</p>{note_html}
<div class="headline">{cards}</div>{body}
</body></html>
"""
    write_text(path, page)
    return Path(path)
