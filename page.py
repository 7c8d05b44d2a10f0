"""The frame of a report page: one self-contained HTML file, its CSS and its few lines of JS inline, nothing fetched.

    page("title", "<h1>...</h1>")   # a whole document: <style> in the head, the body, one <script> at the end

The JS sorts a table by the heading clicked (numbers by their exact value in data-v), opens the query a link points
to, and shows a passage's docid and text when the pointer rests on its square. `e` escapes every text that comes from
data or a model, so a passage holding `<script>` is shown, never run.

Reading order: a leaf beside the rest (it imports nothing of the project); report.py builds its pages with it.
"""

from __future__ import annotations

import html

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1360px;padding:16px 24px;
color:#1f2328;background:#fff}
h1{font-size:20px;margin:4px 0 8px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:14px;margin:14px 0 6px}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;padding:6px 8px;border-radius:4px;max-height:22em;
overflow:auto}
pre.cmd{background:#f6f8fa;border:1px solid #d0d7de}
pre.think{background:#f6f8fa;color:#444;border-left:3px solid #8c959f}
pre.answer{background:#fff8c5;border-left:3px solid #bf8700;font-weight:600}
table{border-collapse:collapse;margin:4px 0}
th,td{border-bottom:1px solid #eaeef2;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;position:sticky;top:0}
th[data-k]{cursor:pointer}th[data-k]:hover{background:#eaeef2}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#1a7f37}.down{color:#cf222e}.muted{color:#656d76}
.kv td:first-child{color:#656d76}
.g{display:inline-block;min-width:17px;height:17px;line-height:17px;margin:1px;border-radius:3px;text-align:center;
font-size:11px;text-decoration:none;color:#1f2328;border:1px solid transparent}
.g0{background:#e6e8eb}.g1{background:#c6f0cf}.g2{background:#6fd38a}.g3{background:#1a7f37;color:#fff}
.gu{background:#fff;border:1px dashed #8c959f;color:#8c959f}
.pick{outline:2px solid #bf8700;outline-offset:1px}
.legend .g{width:auto;padding:0 5px}
details.q{border:1px solid #d0d7de;border-radius:6px;margin:8px 0;padding:0 10px}
details.q>summary{padding:7px 0;cursor:pointer;font-weight:600}
details.q[open]>summary{border-bottom:1px solid #eaeef2;margin-bottom:6px}
details.w{margin:6px 0 10px;padding-left:8px;border-left:2px solid #d0d7de}
details.w>summary{cursor:pointer;color:#424a53}
.row{margin:2px 0}.row>b{display:inline-block;width:110px;font-weight:500;color:#656d76}
.passages td:nth-child(-n+2){text-align:right;font-variant-numeric:tabular-nums}.passages td:nth-child(2){color:#656d76}
.passages td.d{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}.passages td.t{max-width:820px}
td.strip{white-space:nowrap}
.two{display:grid;grid-template-columns:1fr 1fr;gap:16px}.two>div{min-width:0}
.badge{font-size:11px;padding:0 5px;border-radius:8px;background:#eaeef2;color:#424a53;font-weight:500}
.ok{background:#dafbe1;color:#1a7f37}.bad{background:#ffebe9;color:#cf222e}
"""

# click a heading to sort by it (twice: the other way); following a link to a query opens it
JS = """
document.querySelectorAll("th[data-k]").forEach(th => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], i = th.cellIndex, asc = th.dataset.dir !== "asc";
  const key = r => th.dataset.k === "n" ? parseFloat(r.cells[i].dataset.v) : r.cells[i].textContent;
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
    .forEach(r => body.appendChild(r));
  th.dataset.dir = asc ? "asc" : "desc";
  th.closest("tr").querySelectorAll("th").forEach(h => h.textContent = h.textContent.replace(/ [▲▼]$/, ""));
  th.textContent += asc ? " ▲" : " ▼";
}));
function openTarget() {
  const el = location.hash && document.getElementById(location.hash.slice(1));
  for (let d = el; d; d = d.parentElement) if (d.tagName === "DETAILS") d.open = true;
}
addEventListener("hashchange", openTarget); openTarget();
document.addEventListener("mouseover", ev => {
  const a = ev.target.closest && ev.target.closest("a.g");
  const row = a && !a.title && document.getElementById(a.hash.slice(1));
  if (row) a.title = row.querySelector(".d").textContent + ": " + row.querySelector(".t").textContent.slice(0, 240);
});
"""


def e(x: object) -> str:
    """Text (or an attribute value) made safe to put in the page: what data or a model wrote is shown, never run."""
    return html.escape(str(x), quote=True)


def page(title: str, body: str) -> str:
    """A whole HTML document: `body` between the inline CSS and the inline JS."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n<script>{JS}</script></body></html>\n")
