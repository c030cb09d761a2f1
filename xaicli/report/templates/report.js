// xaicli report: the image grid. Filters, sorting, search and paging over the rows embedded in
// #report-data; only the rows of the current page are in the document, and their pictures load
// lazily. No library, no request beyond the report's own files.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const $ = (id) => document.getElementById(id);
  const S = { q: "", cls: "", method: "", status: "", agree: "", sort: "path", desc: false, page: 0, size: 50 };
  const multi = D.runs.length > 1;

  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function fmt(v) {
    if (v == null) return "–";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : (Math.round(v * 1000) / 1000).toString();
  }
  function pct(p) { return p == null ? "" : (100 * p).toFixed(1) + "%"; }
  function top1(row, run) { const k = row.k[run] || []; return k.length ? k[0][0] : null; }

  // ---- controls -------------------------------------------------------------------------
  function fillControls() {
    const counts = new Map();
    for (const row of D.rows) {
      const seen = new Set(row.k.map((k) => (k.length ? k[0][0] : null)).filter((x) => x != null));
      for (const c of seen) counts.set(c, (counts.get(c) || 0) + 1);
    }
    const cls = $("class-filter");
    [...counts.entries()].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0]))).forEach(([c, n]) => {
      cls.add(new Option(`${c} (${n})`, c));
    });
    const methods = [...new Set(D.columns.map((c) => c.method))];
    methods.forEach((m) => $("method-filter").add(new Option(m, m)));
    const sort = $("sort");
    sort.add(new Option("path", "path"));
    D.runs.forEach((r, i) => sort.add(new Option(`${multi ? r.name + ": " : ""}top-1 probability`, `top:${i}`)));
    D.columns.forEach((c, i) => {
      for (const key of c.keys) {
        const arrow = D.lower.includes(key) ? " ↓" : D.higher.includes(key) ? " ↑" : "";
        sort.add(new Option(`${c.title}: ${key}${arrow}`, `c:${i}:${key}`));
      }
    });
    const bind = (id, key, conv) => $(id) && $(id).addEventListener("input", (e) => { S[key] = conv ? conv(e.target.value) : e.target.value; S.page = 0; render(); });
    bind("search", "q", (v) => v.trim().toLowerCase());
    bind("class-filter", "cls");
    bind("method-filter", "method");
    bind("status-filter", "status");
    bind("agree-filter", "agree");
    bind("sort", "sort");
    bind("order", "desc", (v) => v === "desc");
    bind("page-size", "size", (v) => parseInt(v, 10));
    $("prev").addEventListener("click", () => { if (S.page > 0) { S.page--; render(true); } });
    $("next").addEventListener("click", () => { S.page++; render(true); });
  }

  // ---- rows -----------------------------------------------------------------------------
  function sortValue(row) {
    if (S.sort === "path") return row.p;
    if (S.sort.startsWith("top:")) { const k = row.k[+S.sort.slice(4)] || []; return k.length ? k[0][1] : null; }
    const [, i, key] = S.sort.split(":");
    const cell = row.c[+i];
    return cell && cell.v[key] != null ? cell.v[key] : null;
  }
  function visibleRows() {
    const rows = D.rows.filter((row) => {
      if (S.q && !row.p.toLowerCase().includes(S.q)) return false;
      if (S.status && row.s !== S.status) return false;
      if (S.cls && !row.k.some((k) => k.length && k[0][0] === S.cls)) return false;
      if (S.agree) {
        const t = row.k.map((k) => (k.length ? k[0][0] : null));
        const same = t.every((x) => x === t[0]);
        if ((S.agree === "same") !== same) return false;
      }
      return true;
    });
    const keyed = rows.map((row) => [sortValue(row), row]);
    const dir = S.desc ? -1 : 1;
    keyed.sort((a, b) => {
      if (a[0] == null && b[0] == null) return a[1].p < b[1].p ? -1 : 1;
      if (a[0] == null) return 1;  // rows without the value last, whatever the order
      if (b[0] == null) return -1;
      if (a[0] < b[0]) return -dir;
      if (a[0] > b[0]) return dir;
      return a[1].p < b[1].p ? -1 : 1;
    });
    return keyed.map((x) => x[1]);
  }
  function visibleColumns() {
    return D.columns.map((c, i) => [c, i]).filter(([c]) => !S.method || c.method === S.method);
  }

  function boxes(list, w, h, cls, title) {
    if (!list || !w || !h) return "";
    return list.filter((b) => b && b.length === 4 && b.every((v) => v != null)).map((b) => {
      const [x0, y0, x1, y1] = b;
      const st = `left:${(100 * x0) / w}%;top:${(100 * y0) / h}%;width:${(100 * (x1 - x0 + 1)) / w}%;height:${(100 * (y1 - y0 + 1)) / h}%`;
      return `<div class="box ${cls}" style="${st}" title="${esc(title)}"></div>`;
    }).join("");
  }
  function picture(src, link, alt, extra) {
    if (!src) return `<div class="none">${esc(alt)}</div>`;
    const img = `<img loading="lazy" src="${src}" alt="${esc(alt)}" onerror="this.outerHTML='<div class=none>picture missing</div>'">`;
    return `<div class="pic">${link ? `<a href="${link}" target="_blank">${img}</a>` : img}${extra || ""}</div>`;
  }
  function infoCell(row) {
    let h = `<div class="path">${esc(row.p)}</div>`;
    if (row.w) h += `<div class="muted">${row.w} × ${row.h}</div>`;
    if (row.e) h += `<div class="err">failed: ${esc(row.e)}</div>`;
    row.k.forEach((k, i) => {
      if (!k.length) return;
      h += `${multi ? `<div class="muted">${esc(D.runs[i].name)} predicts:</div>` : ""}<ol>` +
        k.map(([l, p]) => `<li>${esc(l)} <span class="muted">${pct(p)}</span></li>`).join("") + "</ol>";
    });
    return `<td class="info">${h}</td>`;
  }
  function cellHtml(row, cell, col) {
    if (!cell) return `<td>${row.s === "error" ? "" : '<div class="none">not explained</div>'}</td>`;
    const gt = boxes(row.g, row.w, row.h, "gt", "ground truth");
    const bx = D.runs[col.run].draw_boxes ? boxes(cell.b, row.w, row.h, "", "map box at " + D.runs[col.run].box_thresholds) : "";
    // The scores under the picture (the map's own statistics stay sortable, not shown).
    const vals = Object.entries(cell.v).filter(([k]) => k !== "prob" && !k.startsWith("map_")).map(([k, v]) => `${esc(k)} ${fmt(v)}`).join(" · ");
    return `<td>${picture(cell.t, cell.f, col.title, gt + bx)}<div class="cap">${esc(cell.l)} ${pct(cell.q)}` +
      `${cell.r > 1 ? ` <span class="muted">(rank ${cell.r})</span>` : ""}${vals ? `<div class="vals">${vals}</div>` : ""}</div></td>`;
  }
  function legend(l) {
    if (!l) return "";
    return `<div class="legend" title="${esc(l.note || "")}"><span>${esc(l.low)}</span><span class="bar" style="background:${l.css}">` +
      `${l.mid != null ? '<span class="mid"></span>' : ""}</span><span>${esc(l.high)}</span></div>`;
  }
  function header(cols) {
    const ths = cols.map(([c]) => `<th data-method="${esc(c.method)}">${esc(c.title)}${multi ? ` <span class="colrun">run ${esc(D.runs[c.run].name)}</span>` : ""}${legend(c.legend)}</th>`);
    return `<tr><th>image</th><th>original</th>${ths.join("")}</tr>`;
  }

  function render(scroll) {
    const rows = visibleRows();
    const cols = visibleColumns();
    const pages = Math.max(1, Math.ceil(rows.length / S.size));
    S.page = Math.min(S.page, pages - 1);
    const start = S.page * S.size;
    const shown = rows.slice(start, start + S.size);
    document.querySelector("#images-table thead").innerHTML = header(cols);
    document.querySelector("#images-table tbody").innerHTML = shown.map((row) => {
      const t = row.k.map((k) => (k.length ? k[0][0] : null));
      const differ = multi && !t.every((x) => x === t[0]);
      const orig = picture(row.o, row.of, "original not found", boxes(row.g, row.w, row.h, "gt", "ground truth"));
      return `<tr class="row${differ ? " diff" : ""}" data-path="${esc(row.p)}" data-status="${row.s}">${infoCell(row)}<td>${orig}</td>` +
        cols.map(([c, i]) => cellHtml(row, row.c[i], c)).join("") + "</tr>";
    }).join("");
    $("count").textContent = rows.length ? `${start + 1}–${start + shown.length} of ${rows.length} image${rows.length === 1 ? "" : "s"}` +
      (rows.length < D.rows.length ? ` (${D.rows.length} in all)` : "") : `no image matches (${D.rows.length} in all)`;
    $("page").textContent = `${S.page + 1} / ${pages}`;
    $("prev").disabled = S.page === 0;
    $("next").disabled = S.page >= pages - 1;
    if (scroll) $("images").scrollIntoView();
  }

  fillControls();
  render();
  document.body.dataset.ready = "1";
})();
