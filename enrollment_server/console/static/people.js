// People: list and search, add a person (photos by file picker or drag and drop, each photo's verdict), add photos,
// rename, deactivate, remove (every door forgets them: shown with each door's acknowledgement).
"use strict";

(() => {
  const { el, clear, api } = FA;
  let people = [];
  let query = "";

  FA.page(async (root) => {
    FA.onSite(() => load(root));
    await load(root);
  });

  async function load(root) {
    const data = await api("/console/people", { query: { site: FA.site() } });
    people = data.people;
    render(root);
  }

  function render(root) {
    const search = el("input", {
      type: "search",
      placeholder: "Search by name or id",
      value: query,
      "aria-label": "Search people",
      oninput: (e) => {
        query = e.target.value;
        drawCards(cards);
        count.textContent = summary();
      },
    });
    const count = el("span", { class: "muted small" });
    const cards = el("div", { class: "cards", id: "people-cards" });
    clear(
      root,
      el(
        "div",
        { class: "toolbar" },
        search,
        count,
        el("span", { class: "grow" }),
        el("button", { class: "btn primary", type: "button", id: "add-person", onclick: () => enrollDialog(root) }, "+ Add person"),
      ),
      cards,
    );
    drawCards(cards);
    count.textContent = summary();
  }

  const visible = () => {
    const q = query.trim().toLowerCase();
    return people.filter((p) => !q || p.name.toLowerCase().includes(q) || p.person_id.toLowerCase().includes(q));
  };
  const summary = () => {
    const active = people.filter((p) => p.active).length;
    return `${visible().length} shown · ${people.length} enrolled at ${FA.site()} · ${active} active`;
  };

  function drawCards(cards) {
    const shown = visible();
    if (!shown.length) {
      clear(
        cards,
        el(
          "div",
          { class: "panel empty" },
          el("h3", {}, people.length ? "Nobody matches that search" : "Nobody is enrolled at this site yet"),
          el("p", {}, people.length ? "Try part of a name or an id." : "Add a person with one or more photos of their face."),
        ),
      );
      return;
    }
    clear(cards, shown.map(card));
  }

  function card(p) {
    const menuButton = el("button", { class: "btn ghost small menu-btn", type: "button", "aria-label": `Actions for ${p.name}` }, "⋯");
    menuButton.addEventListener("click", (e) => openMenu(e.currentTarget, p));
    return el(
      "div",
      { class: `card${p.active ? "" : " inactive"}`, dataset: { person: p.person_id } },
      FA.avatar(p.person_id, p.name, p.thumbnail_template),
      el(
        "div",
        { class: "meta" },
        el("div", { class: "name" }, p.name),
        el("div", { class: "sub mono" }, p.person_id),
        el(
          "div",
          { class: "tags" },
          el("span", { class: "badge plain info" }, `${p.templates} face${p.templates === 1 ? "" : "s"}`),
          p.active ? null : el("span", { class: "badge idle" }, "inactive"),
        ),
      ),
      menuButton,
    );
  }

  function openMenu(anchor, p) {
    document.querySelectorAll(".menu").forEach((m) => m.remove());
    const item = (label, run, cls = "") =>
      el("button", { type: "button", class: cls, onclick: () => { menu.remove(); run(); } }, label);
    const menu = el(
      "div",
      { class: "menu", role: "menu" },
      item("Add photos", () => enrollDialog(FA.content(), p)),
      item("Rename", () => renameDialog(p)),
      item(p.active ? "Deactivate" : "Reactivate", () => activeDialog(p)),
      item("Remove…", () => removeDialog(p), "danger"),
    );
    const r = anchor.getBoundingClientRect();
    menu.style.top = `${window.scrollY + r.bottom + 4}px`;
    menu.style.left = `${window.scrollX + r.right - 170}px`;
    document.body.append(menu);
    setTimeout(() => document.addEventListener("click", () => menu.remove(), { once: true }), 0);
  }

  // ---- enrollment ----

  function enrollDialog(root, existing) {
    const files = [];
    const name = el("input", { type: "text", id: "person-name", maxlength: "256", value: existing ? existing.name : "", disabled: !!existing });
    const pid = el("input", { type: "text", id: "person-id", maxlength: "128", class: "mono", value: existing ? existing.person_id : "", disabled: !!existing });
    let idEdited = false;
    pid.addEventListener("input", () => (idEdited = true));
    name.addEventListener("input", () => {
      if (!idEdited) pid.value = FA.slug(name.value);
    });
    const picker = el("input", { type: "file", id: "photo-input", accept: "image/*", multiple: true, class: "hidden" });
    const list = el("div", { class: "photos", id: "photo-list" });
    const drop = el(
      "div",
      { class: "dropzone", id: "dropzone", tabindex: "0", role: "button" },
      el("div", {}, el("strong", {}, "Choose photos"), " or drag them here"),
      el("div", { class: "small" }, "One face per photo, looking at the camera; several photos help. JPEG, PNG, WebP."),
    );
    const add = (fileList) => {
      for (const f of fileList) files.push(f);
      drawFiles();
    };
    drop.addEventListener("click", () => picker.click());
    drop.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && picker.click());
    picker.addEventListener("change", () => add(picker.files));
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      add(e.dataTransfer.files);
    });
    const results = el("div", { class: "photos", id: "enroll-results" });
    const warning = el("div", { id: "duplicate-warning" });

    function drawFiles(report) {
      clear(
        list,
        files.map((f, i) => {
          const verdict = report && report.photos[i];
          const state = verdict ? (verdict.accepted ? "accepted" : "rejected") : "";
          const why = !verdict
            ? `${Math.round(f.size / 1024)} KB`
            : verdict.accepted
              ? "Enrolled"
              : verdict.reason === "probable_duplicate_identity"
                ? `Looks like ${verdict.matched_person} (distance ${verdict.distance.toFixed(3)}): see below`
                : FA.verdictText(verdict.reason, verdict.message);
          return el(
            "div",
            { class: `photo-row ${state}`, dataset: { file: f.name } },
            el("img", { src: URL.createObjectURL(f), alt: "" }),
            el("div", { class: "meta" }, el("div", { class: "file" }, f.name), el("div", { class: "why" }, why)),
            verdict
              ? el("span", { class: `badge ${verdict.accepted ? "ok" : "bad"}` }, verdict.accepted ? "accepted" : "rejected")
              : el("button", { type: "button", class: "btn ghost small", onclick: () => { files.splice(i, 1); drawFiles(); } }, "Remove"),
          );
        }),
      );
    }

    async function submit(allowDuplicate) {
      const personId = pid.value.trim();
      if (!existing && !name.value.trim()) throw new Error("Give the person's name.");
      if (!personId) throw new Error("Give a person id.");
      if (!files.length) throw new Error("Add at least one photo.");
      const form = new FormData();
      for (const f of files) form.append("files", f, f.name);
      if (!existing) {
        form.set("name", name.value.trim());
        form.set("site", FA.site());
      }
      if (allowDuplicate) form.set("allow_duplicate_identity", "true");
      let report;
      try {
        report = await api(`/people/${encodeURIComponent(personId)}/faces`, { method: "POST", form });
      } catch (e) {
        if (!(e instanceof FA.ApiError) || !e.body.photos) throw e;
        report = e.body; // 422: nothing was added; the body is the per-photo report
      }
      drawFiles(report);
      clear(warning);
      const dup = report.photos.find((p) => p.reason === "probable_duplicate_identity");
      if (dup) {
        warning.append(await duplicateNotice(dup, () => submit(true)));
        return undefined; // keep the dialog open
      }
      if (report.added) {
        FA.toast(`${report.person_id}: ${report.added} photo${report.added === 1 ? "" : "s"} enrolled` +
          (report.rejected ? `, ${report.rejected} rejected` : "") + publishedText(report.gallery), "ok");
        await load(root);
        if (!report.rejected) return true;
      }
      return undefined; // rejected photos stay visible with their reasons
    }

    FA.dialog({
      title: existing ? `Add photos of ${existing.name}` : "Add a person",
      wide: true,
      body: [
        existing ? null : el("div", { class: "row2" },
          el("label", { class: "field", for: "person-name" }, "Name", name),
          el("label", { class: "field", for: "person-id" }, el("span", {}, "Person id ", el("span", { class: "hint" }, "(letters, digits, . _ - @ +)")), pid)),
        drop,
        picker,
        list,
        warning,
        results,
      ],
      actions: [
        { label: "Close", value: null },
        { label: existing ? "Enroll photos" : "Enroll", kind: "primary", run: () => submit(false) },
      ],
    });
  }

  async function duplicateNotice(dup, override) {
    const other = dup.matched_person;
    const known = people.find((p) => p.person_id === other);
    const face = known ? FA.avatar(other, known.name, known.thumbnail_template) : el("div", { class: "avatar" }, "?");
    return el(
      "div",
      { class: "notice warn" },
      el(
        "div",
        { class: "resembles" },
        face,
        el(
          "div",
          {},
          el("strong", {}, `Looks like ${known ? known.name : other} (${other})`),
          el("div", {}, `Face distance ${dup.distance.toFixed(3)}: the server considers faces this close one person. Nobody was created.`),
          el("div", { class: "small" }, "If they really are different people (twins, look-alikes), enroll anyway."),
          el("button", { type: "button", class: "btn small", id: "enroll-anyway", onclick: () => override().catch(FA.failed) }, "Enroll anyway: different people"),
        ),
      ),
    );
  }

  function publishedText(gallery) {
    if (!gallery) return "";
    if (gallery.published) return "; the doors get the new gallery now";
    if (gallery.changed) return "; stored (the gallery goes out when the broker is back)";
    return "";
  }

  // ---- rename, (de)activate ----

  function renameDialog(p) {
    const input = el("input", { type: "text", value: p.name, maxlength: "256", id: "rename-input" });
    FA.dialog({
      title: `Rename ${p.name}`,
      body: [el("label", { class: "field" }, "Display name", input), el("p", { class: "small muted" }, "Doors show the new name from the next gallery version on; past attendance keeps the id.")],
      actions: [
        { label: "Cancel", value: null },
        {
          label: "Rename",
          kind: "primary",
          run: async () => {
            const out = await api(`/people/${encodeURIComponent(p.person_id)}`, { method: "PATCH", json: { name: input.value } });
            FA.toast(`Renamed to ${out.person.name}${publishedText(out.gallery)}`, "ok");
            await load(FA.content());
            return true;
          },
        },
      ],
    });
  }

  async function activeDialog(p) {
    const deactivate = p.active;
    const ok = await FA.confirmDialog(
      deactivate ? `Deactivate ${p.name}?` : `Reactivate ${p.name}?`,
      deactivate
        ? ["Doors stop recognising them at the next gallery version. Their face templates and attendance history are kept; reactivate them at any time."]
        : ["Doors recognise them again from the next gallery version."],
      deactivate ? "Deactivate" : "Reactivate",
    );
    if (!ok) return;
    try {
      const out = await api(`/people/${encodeURIComponent(p.person_id)}`, { method: "PATCH", json: { active: !deactivate } });
      FA.toast(`${out.person.name} ${out.person.active ? "reactivated" : "deactivated"}${publishedText(out.gallery)}`, "ok");
      await load(FA.content());
    } catch (e) {
      FA.failed(e);
    }
  }

  // ---- removal, with every door's acknowledgement ----

  async function removeDialog(p) {
    const steps = el("ul", { class: "steps", id: "removal-steps" });
    let removed = false;
    let timer = null;
    const stop = () => timer && clearInterval(timer);
    await FA.dialog({
      title: `Remove ${p.name}?`,
      body: [
        el("p", {}, `This deletes ${p.name}'s ${p.templates} face template${p.templates === 1 ? "" : "s"}. `,
          "Every door forgets them: the server publishes a new gallery version without them, and each door acknowledges applying it (below). ",
          "Their past attendance records stay."),
        el("p", { class: "small muted" }, "To stop recognising someone only for a while, deactivate them instead."),
        steps,
      ],
      actions: [
        { label: "Close", value: null },
        {
          label: "Remove",
          kind: "danger",
          run: async (dlg) => {
            if (removed) return null;
            const out = await api(`/people/${encodeURIComponent(p.person_id)}`, { method: "DELETE" });
            removed = true;
            dlg.querySelector(".btn.danger").remove(); // done: nothing more to remove
            await load(FA.content());
            const gallery = await api(`/sites/${encodeURIComponent(FA.site())}/gallery`);
            clear(steps, el("li", {}, el("span", { class: "badge ok" }, "removed"),
              `${out.templates_removed} template${out.templates_removed === 1 ? "" : "s"} deleted; ` +
                (out.gallery.published ? `gallery version ${gallery.version} published` : "gallery goes out when the broker is back")));
            const doors = el("ul", { class: "steps", id: "door-acks" }, el("li", { class: "muted" }, "Waiting for the doors…"));
            steps.append(el("li", {}, doors));
            const poll = async () => {
              const devices = (await api(`/sites/${encodeURIComponent(FA.site())}/devices`)).devices;
              const applied = (d) => d.gallery_version !== null && gallery.version !== null && d.gallery_version >= gallery.version;
              clear(
                doors,
                devices.length
                  ? devices.map((d) =>
                      el("li", { dataset: { device: d.device_id } },
                        el("span", { class: `badge ${applied(d) ? "ok" : d.state === "online" ? "warn" : "idle"}` }, applied(d) ? "forgotten" : "pending"),
                        el("span", { class: "mono" }, d.device_id),
                        applied(d) ? `applied v${d.gallery_version}` : `still on v${d.gallery_version ?? "–"} (${d.state})`))
                  : el("li", { class: "muted" }, "No door has reported at this site yet."),
              );
              return devices.every(applied);
            };
            if (!(await poll())) {
              const started = Date.now();
              timer = setInterval(async () => {
                try {
                  if ((await poll()) || Date.now() - started > 120000) stop();
                } catch (e) {
                  stop();
                  FA.failed(e);
                }
              }, 1500);
            }
            return undefined;
          },
        },
      ],
    });
    stop();
  }
})();
