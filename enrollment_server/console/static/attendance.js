// Attendance: per site, first and last seen per person and door for each day of a range; arrivals per hour (an SVG
// drawn here); CSV download of the same rows.
"use strict";

(() => {
  const { el, clear, api } = FA;
  const state = { from: FA.localDay(), to: FA.localDay() };

  FA.page(async (root) => {
    FA.onSite(() => load(root));
    await load(root);
  });

  const query = () => ({ site: FA.site(), date_from: state.from, date_to: state.to, tz: FA.tz });

  async function load(root) {
    const data = await api("/console/attendance", { query: query() });
    render(root, data);
  }

  function render(root, data) {
    const from = el("input", { type: "date", id: "date-from", value: state.from, "aria-label": "From" });
    const to = el("input", { type: "date", id: "date-to", value: state.to, "aria-label": "To" });
    const apply = () => {
      state.from = from.value || FA.localDay();
      state.to = to.value && to.value >= state.from ? to.value : state.from;
      load(root).catch(FA.failed);
    };
    from.addEventListener("change", apply);
    to.addEventListener("change", apply);
    const today = () => {
      state.from = state.to = FA.localDay();
      load(root).catch(FA.failed);
    };
    const week = () => {
      const d = new Date();
      d.setDate(d.getDate() - 6);
      state.from = FA.localDay(d);
      state.to = FA.localDay();
      load(root).catch(FA.failed);
    };
    const csv = el("a", { class: "btn", id: "csv-download", href: FA.apiUrl("/console/attendance", { ...query(), format: "csv" }), download: "" }, "Download CSV");
    const peak = data.arrivals_by_hour.reduce((best, n, h) => (n > data.arrivals_by_hour[best] ? h : best), 0);
    const arrivals = data.arrivals_by_hour.reduce((a, b) => a + b, 0);
    const days = Math.round((new Date(data.date_to) - new Date(data.date_from)) / 86400000) + 1;
    clear(
      root,
      el("div", { class: "toolbar" },
        el("label", { class: "site-picker" }, "From", from),
        el("label", { class: "site-picker" }, "to", to),
        el("button", { type: "button", class: "btn ghost", onclick: today }, "Today"),
        el("button", { type: "button", class: "btn ghost", onclick: week }, "Last 7 days"),
        el("span", { class: "grow" }),
        el("span", { class: "muted small" }, `Times in ${data.tz}`),
        csv),
      el("div", { class: "tiles" },
        tile("People", data.people, "tile-people"),
        tile("Arrivals", arrivals),
        tile("Events", data.events),
        tile("Busiest hour", arrivals ? `${String(peak).padStart(2, "0")}:00` : "–"),
        tile(days === 1 ? "Day" : "Days", days === 1 ? FA.fmtDay(data.date_from) : days)),
      el("div", { class: "split" },
        el("div", { class: "panel" },
          el("div", { class: "panel-head" }, el("h2", {}, "Arrivals per hour"), el("span", { class: "muted small" }, "each person's first sighting of the day")),
          el("div", { class: "panel-body" }, chart(data.arrivals_by_hour))),
        el("div", { class: "panel" },
          el("div", { class: "panel-head" }, el("h2", {}, "First and last seen, per person and door")),
          el("div", { class: "panel-body table-wrap" }, table(data.rows, days > 1)))),
    );
  }

  function tile(label, value, id) {
    return el("div", { class: "tile", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, String(value)));
  }

  function table(rows, showDay) {
    if (!rows.length) return el("div", { class: "empty" }, el("h3", {}, "Nobody was recognised in this period"), el("p", {}, "Recognised people appear here as the doors report them."));
    return el("table", { id: "attendance-table" },
      el("thead", {}, el("tr", {},
        showDay ? el("th", {}, "Day") : null, el("th", {}, "Person"), el("th", {}, "Door"),
        el("th", {}, "First seen"), el("th", {}, "Last seen"), el("th", { class: "num" }, "Events"))),
      el("tbody", {}, rows.map((r) => el("tr", {},
        showDay ? el("td", {}, FA.fmtDay(r.day)) : null,
        el("td", {}, el("div", { class: "who" }, el("div", { class: "avatar" }, FA.initials(r.name || r.person_id)),
          el("div", {}, el("div", {}, r.name || r.person_id), el("div", { class: "muted small mono" }, r.person_id)))),
        el("td", { class: "mono" }, r.door),
        el("td", {}, FA.fmtTime(r.first_seen)),
        el("td", {}, FA.fmtTime(r.last_seen)),
        el("td", { class: "num" }, r.events)))));
  }

  // 24 bars, a few grid lines, hour labels every 3 hours; drawn as SVG elements (no library)
  function chart(bins) {
    const W = 960, H = 240, left = 34, right = 10, top = 14, bottom = 28;
    const max = Math.max(1, ...bins);
    const step = niceStep(max);
    const ceil = Math.ceil(max / step) * step;
    const slot = (W - left - right) / 24;
    const y = (v) => top + (H - top - bottom) * (1 - v / ceil);
    const svg = el("svg", { class: "chart", id: "arrivals-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Arrivals per hour" });
    for (let v = 0; v <= ceil; v += step) {
      svg.append(el("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
      svg.append(el("text", { class: "axis", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, String(v)));
    }
    bins.forEach((n, h) => {
      const x = left + h * slot + slot * 0.16;
      const w = slot * 0.68;
      if (n > 0) {
        svg.append(el("rect", { class: "bar", x, y: y(n), width: w, height: Math.max(1, y(0) - y(n)), rx: 3 },
          el("title", {}, `${String(h).padStart(2, "0")}:00–${String(h).padStart(2, "0")}:59: ${n} arrival${n === 1 ? "" : "s"}`)));
        svg.append(el("text", { class: "val", x: x + w / 2, y: y(n) - 4, "text-anchor": "middle" }, String(n)));
      }
      if (h % 3 === 0) svg.append(el("text", { class: "axis", x: x + w / 2, y: H - 8, "text-anchor": "middle" }, `${String(h).padStart(2, "0")}:00`));
    });
    return svg;
  }

  function niceStep(max) {
    const raw = max / 4;
    const p = 10 ** Math.floor(Math.log10(Math.max(raw, 1)));
    for (const m of [1, 2, 5, 10]) if (raw <= m * p) return Math.max(1, m * p);
    return 10 * p;
  }
})();
