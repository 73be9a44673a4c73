// Doors: the site's decision rule in one line, every device with its online state, applied gallery version and lag,
// the rule it reports in force, fps, outbox depth, last status and last event; stale devices (online by their last
// status, silent since) flagged. Refreshed every 5 s.
"use strict";

(() => {
  const { el, clear, api } = FA;
  let allSites = false;

  FA.page(async (root) => {
    FA.onSite(() => load(root));
    await load(root);
    setInterval(() => load(root).catch(() => {}), 5000);
  });

  async function load(root) {
    const data = await api("/console/doors", { query: allSites ? {} : { site: FA.site() } });
    render(root, data);
  }

  function stateBadge(d) {
    if (d.stale) return el("span", { class: "badge warn" }, "stale");
    const kind = { online: "ok", offline: "bad", stopped: "idle", unknown: "idle" }[d.state] || "idle";
    return el("span", { class: `badge ${kind}` }, d.state);
  }

  function render(root, data) {
    const doors = data.doors;
    const online = doors.filter((d) => d.state === "online" && !d.stale).length;
    const stale = doors.filter((d) => d.stale).length;
    const down = doors.filter((d) => d.state === "offline").length;
    const behind = doors.filter((d) => d.sync !== "current").length;
    const toggle = el("label", { class: "check" }, el("input", { type: "checkbox", checked: allSites, onchange: (e) => { allSites = e.target.checked; load(root).catch(FA.failed); } }), "All sites");
    clear(
      root,
      el("div", { class: "tiles" },
        tile("Doors", doors.length),
        tile("Online", online, online === doors.length && doors.length ? "ok" : ""),
        tile("Stale", stale, stale ? "warn" : ""),
        tile("Offline", down, down ? "bad" : ""),
        tile("Gallery not current", behind, behind ? "warn" : "")),
      el("p", { id: "site-decision", class: "muted" }, `Decision at ${data.decision.site}: `, el("strong", {}, data.decision.summary),
        data.decision.source === "site" ? "" : " (enrollment-server calibrate --apply fits the site's own)"),
      el("div", { class: "toolbar" },
        el("span", { class: "muted small" }, `A door is stale when it says online but the server has not heard from it for ${Math.round(data.stale_after_s)} s. Refreshed every 5 s.`),
        el("span", { class: "grow" }), toggle),
      el("div", { class: "panel table-wrap" }, doors.length ? table(doors) : el("div", { class: "empty" }, el("h3", {}, "No door has reported yet"),
        el("p", {}, "Doors appear when their edge agent connects to the broker and publishes its status."))),
    );
  }

  function tile(label, value, kind = "") {
    return el("div", { class: "tile" }, el("div", { class: "label" }, label), el("div", { class: `value ${kind}` }, String(value)));
  }

  function table(doors) {
    return el("table", { id: "doors-table" },
      el("thead", {}, el("tr", {},
        el("th", {}, "Door"), el("th", {}, "State"), el("th", {}, "Gallery"), el("th", { class: "num" }, "FPS"),
        el("th", { class: "num" }, "Outbox"), el("th", {}, "Last status"), el("th", {}, "Last event"), el("th", {}, "Agent"))),
      el("tbody", {}, doors.map((d) => el("tr", { dataset: { device: d.device_id } },
        el("td", {}, el("div", { class: "mono" }, d.device_id), el("div", { class: "muted small" }, `site ${d.site}`)),
        el("td", {}, stateBadge(d), d.mqtt_connected === false ? el("div", { class: "muted small" }, "broker link down") : null),
        el("td", {}, gallery(d)),
        el("td", { class: "num" }, d.fps === null ? "–" : d.fps.toFixed(1)),
        el("td", { class: "num" }, outbox(d)),
        el("td", {}, FA.fmtAgo(d.silent_s), el("div", { class: "muted small" }, FA.fmtDateTime(d.last_seen))),
        el("td", {}, lastEvent(d.last_event)),
        el("td", { class: "mono small" }, d.agent_version || "–")))));
  }

  function gallery(d) {
    const applied = d.gallery_version === null ? "none" : `v${d.gallery_version}`;
    const latest = d.latest_version === null ? "" : ` of v${d.latest_version}`;
    return el("div", {}, `${applied}${latest} `, syncBadge(d), ruleLine(d.decision));
  }

  // the rule the door reports in force, and where it comes from (its config, the site's, the encoder's default)
  function ruleLine(r) {
    if (!r) return null;
    const t = r.threshold === null ? "inf" : r.threshold.toFixed(2);
    const cap = r.max_distance === null ? "" : `, cap ${r.max_distance.toFixed(2)}`;
    return el("div", { class: "muted small" }, `${r.rule} ${t}${cap} (${r.source})`);
  }

  // where the door's gallery stands against the site's newest release (enrollment_server.store.SYNC_STATES)
  function syncBadge(d) {
    const text = {
      current: "current",
      behind: `${d.lag} behind`,
      ahead: `${d.lag === null ? "" : -d.lag + " "}ahead (restored server?)`,
      other_epoch: "other epoch",
      unpublished: "nothing published",
    }[d.sync] || d.sync;
    return el("span", { class: `badge ${d.sync === "current" ? "ok" : "warn"} plain` }, text);
  }

  function outbox(d) {
    if (d.outbox_depth === null) return "–";
    const held = d.outbox_depth > 0 && d.outbox_oldest_age_s ? ` (oldest ${FA.fmtAgo(d.outbox_oldest_age_s).replace(" ago", "")})` : "";
    return `${d.outbox_depth}${held}`;
  }

  function lastEvent(e) {
    if (!e) return el("span", { class: "muted" }, "none yet");
    return el("div", {}, el("div", {}, e.person_id ? e.name || e.person_id : "unknown visitor"),
      el("div", { class: "muted small" }, FA.fmtAgo(FA.secondsSince(e.ts))));
  }
})();
