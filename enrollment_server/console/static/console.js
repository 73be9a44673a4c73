// faceattend console: what every page shares (API calls, DOM building, site picker, dialogs, toasts, formatting).
// Plain JavaScript, no library. Text from the server is only ever set as text (textContent), never parsed as HTML.
"use strict";

const FA = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const defaultSite = decodeURIComponent(document.querySelector('meta[name="default-site"]').content);
  const siteListeners = [];
  let currentSite = null;

  class ApiError extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.error)) || `HTTP ${status}`);
      this.status = status;
      this.body = body || {};
    }
  }

  // fetch under /api/v1 with the session cookie; changes carry the CSRF token; 401 means the session is gone
  async function api(path, { method = "GET", json, form, query } = {}) {
    const url = new URL("/api/v1" + path, location.origin);
    for (const [k, v] of Object.entries(query || {})) {
      if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
    }
    const headers = { Accept: "application/json" };
    let body;
    if (method !== "GET") headers["X-CSRF-Token"] = csrf;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    const res = await fetch(url, { method, headers, body, credentials: "same-origin" });
    if (res.status === 401) {
      location.assign("/console/login");
      throw new ApiError(401, { detail: "session ended" });
    }
    const type = res.headers.get("content-type") || "";
    const data = type.includes("application/json") ? await res.json() : null;
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  function apiUrl(path, query) {
    const url = new URL("/api/v1" + path, location.origin);
    for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null) url.searchParams.set(k, v);
    return url.pathname + url.search;
  }

  // el("div", {class: "x", onclick: fn}, child, "text", ...)
  function el(tag, attrs, ...children) {
    const svg = ["svg", "rect", "line", "text", "g", "title", "path", "circle"].includes(tag);
    const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function clear(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
    return node;
  }

  const content = () => document.getElementById("content");

  function toast(message, kind = "") {
    const t = el("div", { class: `toast ${kind}`, role: "status" }, message);
    document.getElementById("toasts").append(t);
    setTimeout(() => t.remove(), kind === "bad" ? 9000 : 5000);
  }

  function failed(err) {
    console.error(err);
    toast(err.message || String(err), "bad");
  }

  // a modal dialog; resolves with the value of the action chosen (null: cancelled)
  function dialog({ title, body, actions, wide }) {
    return new Promise((resolve) => {
      const foot = el("div", { class: "dlg-foot" });
      const dlg = el(
        "dialog",
        { "aria-label": title },
        el("div", { class: "dlg-head" }, el("h2", {}, title)),
        el("div", { class: "dlg-body" }, body),
        foot,
      );
      if (wide) dlg.style.width = "min(760px, 94vw)";
      let result = null;
      const close = (value) => {
        result = value;
        dlg.close();
      };
      for (const a of actions || [{ label: "Close", value: null }]) {
        const b = el("button", { type: "button", class: `btn ${a.kind || ""}` }, a.label);
        b.addEventListener("click", async () => {
          if (!a.run) return close(a.value);
          b.disabled = true;
          try {
            const v = await a.run(dlg);
            if (v !== undefined) close(v);
          } catch (e) {
            failed(e);
          } finally {
            b.disabled = false;
          }
        });
        foot.append(b);
      }
      dlg.addEventListener("close", () => {
        dlg.remove();
        resolve(result);
      });
      document.body.append(dlg);
      dlg.showModal();
    });
  }

  function confirmDialog(title, paragraphs, label, kind = "primary") {
    return dialog({
      title,
      body: paragraphs.map((p) => (p instanceof Node ? p : el("p", {}, p))),
      actions: [
        { label: "Cancel", value: false },
        { label, value: true, kind },
      ],
    });
  }

  // ---- formatting ----
  const tz = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  const dateFmt = new Intl.DateTimeFormat(undefined, { weekday: "short", day: "numeric", month: "short" });
  const fmtTime = (iso) => (iso ? timeFmt.format(new Date(iso)) : "–");
  const fmtDateTime = (iso) => (iso ? dateTimeFmt.format(new Date(iso)) : "–");
  const fmtDay = (isoDay) => dateFmt.format(new Date(isoDay + "T12:00:00"));
  function fmtAgo(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 5) return "just now";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} days ago`;
  }
  const secondsSince = (iso) => (iso ? Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000) : null);
  function localDay(d = new Date()) {
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
  }
  function initials(name) {
    return (name || "?").split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0].toUpperCase()).join("");
  }
  // a person id from a name: "Émile Zoë" -> "emile-zoe"
  function slug(name) {
    return (name || "")
      .normalize("NFKD")
      .replace(/[\u0300-\u036f]/g, "")
      .toLowerCase()
      .replace(/[^a-z0-9]+/g, "-")
      .replace(/^-+|-+$/g, "")
      .slice(0, 64);
  }
  function avatar(personId, name, templateId) {
    if (templateId === null || templateId === undefined) return el("div", { class: "avatar" }, initials(name));
    const img = el("img", {
      class: "avatar",
      alt: name,
      src: apiUrl(`/people/${encodeURIComponent(personId)}/faces/${templateId}/thumbnail`),
    });
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "avatar" }, initials(name))));
    return img;
  }
  const REASONS = {
    no_face: "No face found",
    several_faces: "Several faces",
    low_confidence: "Face not clear enough",
    too_small: "Face too small",
    too_blurred: "Too blurred",
    off_frontal: "Face turned away",
    unreadable_image: "Not a readable image",
    duplicate_image: "Already enrolled",
    duplicate_template: "Adds nothing new",
    probable_duplicate_identity: "Looks like someone enrolled",
  };
  const reasonText = (code) => REASONS[code] || code || "Rejected";
  // "Too blurred: Laplacian variance 12, need 25"; the message alone when it says no more than the reason
  function verdictText(code, message) {
    const reason = reasonText(code);
    return !message || message.toLowerCase() === reason.toLowerCase() ? reason : `${reason}: ${message}`;
  }

  // ---- the site picker ----
  async function initSites() {
    const select = document.getElementById("site-select");
    const sites = await api("/sites");
    const stored = localStorage.getItem("faceattend.site");
    const ids = sites.map((s) => s.site);
    currentSite = ids.includes(stored) ? stored : ids.includes(defaultSite) ? defaultSite : ids[0];
    clear(select, sites.map((s) => el("option", { value: s.site }, s.name === s.site ? s.site : `${s.name} (${s.site})`)));
    select.value = currentSite;
    select.addEventListener("change", () => {
      currentSite = select.value;
      localStorage.setItem("faceattend.site", currentSite);
      for (const f of siteListeners) f(currentSite);
    });
  }
  const site = () => currentSite;
  const onSite = (f) => siteListeners.push(f);

  function initNav() {
    const page = document.body.dataset.page;
    for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === page);
    document.getElementById("logout").addEventListener("click", async () => {
      const body = new FormData();
      body.set("csrf", csrf);
      await fetch("/console/logout", { method: "POST", body, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" });
      location.assign("/console/login");
    });
  }

  // the page script registers its entry; it runs once the site list is known
  function page(start) {
    document.addEventListener("DOMContentLoaded", async () => {
      initNav();
      try {
        await initSites();
        await start(content());
      } catch (e) {
        failed(e);
      }
    });
  }

  return {
    api, apiUrl, ApiError, el, clear, toast, failed, dialog, confirmDialog, page, site, onSite, content, tz,
    fmtTime, fmtDateTime, fmtDay, fmtAgo, secondsSince, localDay, initials, slug, avatar, reasonText, verdictText,
  };
})();
