// Unknown visitors: the faces the doors decided as unknown, grouped by identity; name a group ("this is <person>",
// "new person") or ignore it. Naming or ignoring deletes the group's faces.
"use strict";

(() => {
  const { el, clear, api } = FA;
  let data = null;
  let people = [];

  FA.page(async (root) => {
    FA.onSite(() => load(root));
    await load(root);
  });

  async function load(root) {
    [data, people] = await Promise.all([
      api("/visitors", { query: { site: FA.site() } }),
      api("/console/people", { query: { site: FA.site() } }).then((d) => d.people),
    ]);
    render(root);
  }

  function render(root) {
    if (!data.enabled) {
      clear(
        root,
        el(
          "div",
          { class: "panel empty", id: "visitors-off" },
          el("h3", {}, `Unknown visitors are off for site ${data.site}`),
          el("p", {}, "Faces of people nobody enrolled are neither sent nor stored: a privacy choice each site makes."),
          el("p", {}, "To turn it on, list the site under ", el("code", {}, "unknown_visitors.sites"), " in the server's configuration and set ",
            el("code", {}, "unknown_faces.share: true"), " in its doors' edge.yaml."),
          data.groups.length ? el("p", {}, `${data.groups.length} group(s) stored earlier are deleted by the retention timer.`) : null,
        ),
      );
      return;
    }
    const total = data.groups.reduce((n, g) => n + g.size, 0);
    clear(
      root,
      el(
        "div",
        { class: "notice" },
        el("div", {},
          el("strong", {}, "Privacy: "),
          `faces of unknown visitors are kept at most ${data.max_age_days} days and ${data.max_faces} per site. `,
          `Naming a group enrolls its ${data.best_crops} best faces (after the quality gate) and deletes the rest; ignoring deletes them all.`),
      ),
      el("div", { class: "toolbar" },
        el("span", { class: "muted small", id: "visitors-summary" },
          `${data.groups.length} visitor${data.groups.length === 1 ? "" : "s"} · ${total} face${total === 1 ? "" : "s"} · grouped at face distance ${data.same_person_distance}`),
        el("span", { class: "grow" }),
        el("button", { type: "button", class: "btn", onclick: () => load(root).catch(FA.failed) }, "Refresh")),
      data.groups.length
        ? el("div", { class: "groups", id: "visitor-groups" }, data.groups.map(groupCard))
        : el("div", { class: "panel empty" }, el("h3", {}, "No unknown visitors"), el("p", {}, "Faces appear here when a door decides a person is unknown.")),
    );
  }

  function groupCard(g) {
    const shown = g.faces.slice(0, g.size > 4 ? 3 : 4);
    const crops = shown.map((f) =>
      el("img", { src: FA.apiUrl(`/visitors/faces/${f.id}/crop`), alt: `face seen at ${f.door}`, title: `${f.door}, ${FA.fmtDateTime(f.ts)} (quality ${f.quality.toFixed(2)})` }),
    );
    if (g.size > 4) crops.push(el("div", { class: "more" }, `+${g.size - 3}`));
    const seen = g.size === 1 ? "Seen once" : `Seen ${g.size} times`;
    const span = g.size === 1 ? FA.fmtDateTime(g.last_seen) : `${FA.fmtDateTime(g.first_seen)} – ${FA.fmtDateTime(g.last_seen)}`;
    const hint = g.nearest_person
      ? el("div", { class: "hint" }, "Closest enrolled: ", el("strong", {}, g.nearest_name || g.nearest_person),
          ` (distance ${g.nearest_distance.toFixed(2)}${g.nearest_distance <= data.same_person_distance ? ", probably them" : ""})`)
      : null;
    return el(
      "div",
      { class: "group", dataset: { group: g.key } },
      el("div", { class: `crops n${crops.length}` }, crops),
      el("div", { class: "body" },
        el("div", { class: "title" }, el("span", {}, `Visitor #${g.key}`), el("span", { class: "badge plain info" }, seen)),
        el("div", { class: "facts" }, span),
        el("div", { class: "facts" }, "At ", g.doors.join(", ")),
        hint),
      el("div", { class: "actions" },
        el("button", { type: "button", class: "btn primary small", onclick: () => assignDialog(g) }, "This is…"),
        el("button", { type: "button", class: "btn small", onclick: () => newPersonDialog(g) }, "New person"),
        el("span", { class: "grow" }),
        el("button", { type: "button", class: "btn ghost small", onclick: () => ignoreGroup(g) }, "Ignore")),
    );
  }

  function reportRows(enrollment) {
    return el("div", { class: "photos" }, enrollment.photos.map((p) =>
      el("div", { class: `photo-row ${p.accepted ? "accepted" : "rejected"}` },
        el("div", { class: "meta" }, el("div", { class: "file" }, p.source),
          el("div", { class: "why" }, p.accepted ? "Enrolled" : FA.verdictText(p.reason, p.message))),
        el("span", { class: `badge ${p.accepted ? "ok" : "bad"}` }, p.accepted ? "accepted" : "rejected"))));
  }

  async function act(path, json, slot) {
    try {
      const out = await api(path, { method: "POST", json });
      const e = out.enrollment;
      FA.toast(`${e.person_id}: ${e.added} face${e.added === 1 ? "" : "s"} enrolled` +
        (e.rejected ? `, ${e.rejected} rejected by the quality gate` : "") +
        (out.gallery.published ? "; the doors get the new gallery now" : ""), "ok");
      await load(FA.content());
      return true;
    } catch (err) {
      if (!(err instanceof FA.ApiError) || !err.body.enrollment) throw err;
      clear(slot, el("div", { class: "notice bad" }, el("div", {}, el("strong", {}, "Nothing was enrolled. "), err.message)), reportRows(err.body.enrollment));
      return err.body.enrollment;
    }
  }

  function assignDialog(g) {
    const select = el("select", { id: "assign-person" },
      people.filter((p) => p.active).map((p) => el("option", { value: p.person_id, selected: p.person_id === g.nearest_person }, `${p.name} (${p.person_id})`)));
    const slot = el("div");
    FA.dialog({
      title: `Who is visitor #${g.key}?`,
      body: [
        el("label", { class: "field" }, "This is", select),
        el("p", { class: "small muted" }, `The ${Math.min(g.size, data.best_crops)} best face(s) become their templates after the quality gate; the doors recognise them from the next gallery version.`),
        slot,
      ],
      actions: [
        { label: "Cancel", value: null },
        {
          label: "Add to this person",
          kind: "primary",
          run: async () => {
            if (!select.value) throw new Error("Nobody is enrolled at this site yet: use New person.");
            const done = await act("/visitors/assign", { site: FA.site(), face_ids: g.face_ids, person_id: select.value }, slot);
            return done === true ? true : undefined;
          },
        },
      ],
    });
  }

  function newPersonDialog(g) {
    const name = el("input", { type: "text", id: "visitor-name", maxlength: "256" });
    const pid = el("input", { type: "text", id: "visitor-person-id", class: "mono", maxlength: "128" });
    let idEdited = false;
    pid.addEventListener("input", () => (idEdited = true));
    name.addEventListener("input", () => { if (!idEdited) pid.value = FA.slug(name.value); });
    const slot = el("div");
    const submit = async (allowDuplicate) => {
      if (!name.value.trim() || !pid.value.trim()) throw new Error("Give a name and a person id.");
      const body = { site: FA.site(), face_ids: g.face_ids, person_id: pid.value.trim(), name: name.value.trim(), allow_duplicate_identity: allowDuplicate };
      const done = await act("/visitors/enroll", body, slot);
      if (done === true) return true;
      const dup = done.photos.find((p) => p.reason === "probable_duplicate_identity");
      if (dup) {
        const known = people.find((p) => p.person_id === dup.matched_person);
        slot.prepend(el("div", { class: "notice warn" }, el("div", { class: "resembles" },
          known ? FA.avatar(known.person_id, known.name, known.thumbnail_template) : el("div", { class: "avatar" }, "?"),
          el("div", {}, el("strong", {}, `Looks like ${known ? known.name : dup.matched_person}`),
            el("div", {}, `distance ${dup.distance.toFixed(3)}. Use "This is…" if it is them.`),
            el("button", { type: "button", class: "btn small", onclick: () => submit(true).then((ok) => ok && document.querySelector("dialog")?.close()).catch(FA.failed) }, "Create anyway: different people")))));
      }
      return undefined;
    };
    FA.dialog({
      title: `New person from visitor #${g.key}`,
      body: [
        el("div", { class: "row2" }, el("label", { class: "field" }, "Name", name), el("label", { class: "field" }, "Person id", pid)),
        el("p", { class: "small muted" }, `Enrolls the ${Math.min(g.size, data.best_crops)} best face(s) of this visitor, after the quality gate.`),
        slot,
      ],
      actions: [
        { label: "Cancel", value: null },
        { label: "Create person", kind: "primary", run: () => submit(false) },
      ],
    });
  }

  async function ignoreGroup(g) {
    const ok = await FA.confirmDialog(`Ignore visitor #${g.key}?`, [`The ${g.size} stored face${g.size === 1 ? "" : "s"} of this visitor are deleted. If they come back, they appear again.`], "Ignore", "danger");
    if (!ok) return;
    try {
      const out = await api("/visitors/ignore", { method: "POST", json: { site: FA.site(), face_ids: g.face_ids } });
      FA.toast(`${out.deleted} face${out.deleted === 1 ? "" : "s"} deleted`, "ok");
      await load(FA.content());
    } catch (e) {
      FA.failed(e);
    }
  }
})();
