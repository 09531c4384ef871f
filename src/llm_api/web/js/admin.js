// Admin pages: a live server summary (polled), users, teams, usage across users, and the audit
// log. The server
// enforces the role (403 for others); this page only shows what the API answers.

import { api } from "./api.js";
import { legend, sparkline, stackedBars } from "./chart.js";
import { $, fmtDate, fmtInt, h, mount, notice } from "./dom.js";
import { spendOf, teamsList, usageSeries } from "./account.js";

const POLL_MS = 3000;
const HISTORY = 60;

let timer = null;
let rates = [];

function refused(container, err) {
  stopPolling();
  mount(
    container,
    h(
      "section",
      { class: "panel", id: "admin-refused" },
      h("h2", {}, "Admin only"),
      notice(
        err.status === 403
          ? `The server refused: ${err.message}`
          : err.status === 401
            ? "Sign in with an admin account to see these pages."
            : `Could not load the admin pages: ${err.message}`,
      ),
    ),
  );
}

function stat(label, value, id) {
  return h("div", { class: "stat" }, h("div", { class: "value", id }, value), h("div", { class: "label" }, label));
}

function renderSummary(el, summary) {
  rates.push(summary.tokens_per_second);
  if (rates.length > HISTORY) rates = rates.slice(-HISTORY);
  mount(
    el,
    h(
      "div",
      { class: "stats" },
      stat("requests running", fmtInt(summary.requests_running), "stat-running"),
      stat("requests waiting", fmtInt(summary.requests_waiting), "stat-waiting"),
      stat("tokens/s", summary.tokens_per_second.toFixed(1), "stat-tps"),
      stat("completion tokens", fmtInt(summary.completion_tokens_total), "stat-tokens"),
    ),
    sparkline(rates, { label: "tokens per second, last 3 minutes" }),
    h(
      "table",
      { id: "models-table" },
      h("thead", {}, h("tr", {}, ["Model", "Running", "Waiting", "Slots", "Queue bound"].map((t) => h("th", {}, t)))),
      h(
        "tbody",
        {},
        summary.models.map((m) =>
          h(
            "tr",
            {},
            h("td", {}, m.id),
            h("td", {}, fmtInt(m.running)),
            h("td", {}, fmtInt(m.waiting)),
            h("td", {}, fmtInt(m.slots)),
            h("td", {}, fmtInt(m.max_waiting)),
          ),
        ),
      ),
    ),
    h("p", { class: "muted" }, `Updated ${new Date().toLocaleTimeString()} · every ${POLL_MS / 1000} s`),
  );
}

function usersTable(users) {
  return h(
    "table",
    { id: "users-table" },
    h("thead", {}, h("tr", {}, ["Email", "Tier", "Role", "Active", "Created"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      users.map((u) =>
        h(
          "tr",
          {},
          h("td", {}, u.email),
          h("td", {}, u.tier),
          h("td", {}, u.role),
          h("td", {}, u.is_active ?? u.active ? "yes" : "no"),
          h("td", {}, fmtDate(u.created_at)),
        ),
      ),
    ),
  );
}

function usageByUser(rows, emails) {
  const totals = new Map();
  for (const row of rows) {
    const who = emails.get(row.user_id) || row.user_id || "—";
    const t = totals.get(who) || { requests: 0, prompt: 0, completion: 0 };
    t.requests += row.requests || 0;
    t.prompt += row.prompt_tokens || 0;
    t.completion += row.completion_tokens || 0;
    totals.set(who, t);
  }
  return h(
    "table",
    { id: "admin-usage-table" },
    h("thead", {}, h("tr", {}, ["User", "Requests", "Prompt tokens", "Completion tokens"].map((t) => h("th", {}, t)))),
    h(
      "tbody",
      {},
      [...totals.entries()].map(([who, t]) =>
        h("tr", {}, h("td", {}, who), h("td", {}, fmtInt(t.requests)), h("td", {}, fmtInt(t.prompt)), h("td", {}, fmtInt(t.completion))),
      ),
    ),
  );
}

function auditQuery(form, extra = {}) {
  const params = new URLSearchParams();
  for (const name of ["action", "actor", "target"]) {
    const value = form.elements[name].value.trim();
    if (value) params.set(name, value);
  }
  for (const [name, value] of Object.entries(extra)) params.set(name, String(value));
  return params;
}

function auditTable(events) {
  const json = (v) => (v ? JSON.stringify(v) : "");
  return h(
    "table",
    { id: "audit-table" },
    h(
      "thead",
      {},
      h("tr", {}, ["Time", "Action", "Actor", "Target", "Before", "After", "Client", "Request"].map((t) => h("th", {}, t))),
    ),
    h(
      "tbody",
      {},
      events.map((e) =>
        h(
          "tr",
          { dataset: { seq: e.seq } },
          h("td", {}, fmtDate(e.created_at)),
          h("td", { class: "audit-action" }, e.action),
          h("td", {}, e.actor),
          h("td", {}, e.target_type ? `${e.target_type} ${e.target_id ?? ""}` : ""),
          h("td", { class: "mono" }, json(e.before)),
          h("td", { class: "mono" }, json(e.after)),
          h("td", {}, e.client_ip ?? ""),
          h("td", { class: "mono" }, e.request_id ?? ""),
        ),
      ),
    ),
  );
}

function auditPanel() {
  const list = h("div", { class: "body", id: "audit-list" }, "Loading…");
  let cursor = null;
  const load = async (form, more) => {
    const params = auditQuery(form, { limit: 50, ...(more && cursor ? { before: cursor } : {}) });
    try {
      const page = await api(`/v1/admin/audit?${params}`);
      cursor = page.next_before;
      const rows = more ? [...list.querySelectorAll("tbody tr")].map((tr) => tr) : [];
      mount(list, auditTable(page.data));
      if (more) list.querySelector("tbody").prepend(...rows);
      if (page.has_more) {
        list.append(h("button", { class: "secondary small", id: "audit-more", onclick: () => load(form, true) }, "Older events"));
      }
    } catch (err) {
      mount(list, notice(`Could not load the audit log: ${err.message}`));
    }
  };
  const download = async (form) => {
    try {
      const response = await api(`/v1/admin/audit?${auditQuery(form, { format: "csv" })}`, { raw: true });
      const url = URL.createObjectURL(await response.blob());
      const link = h("a", { href: url, download: "audit.csv" });
      link.click();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    } catch (err) {
      mount(list, notice(`Could not export the audit log: ${err.message}`));
    }
  };
  const form = h(
    "form",
    {
      class: "filters",
      id: "audit-filters",
      onsubmit: (event) => {
        event.preventDefault();
        load(event.currentTarget, false);
      },
    },
    h("input", { name: "action", placeholder: "action (auth. for a prefix)", "aria-label": "Action" }),
    h("input", { name: "actor", placeholder: "actor (user id or email)", "aria-label": "Actor" }),
    h("input", { name: "target", placeholder: "target id", "aria-label": "Target" }),
    h("button", { type: "submit", class: "small", id: "audit-filter" }, "Filter"),
    h("button", { type: "button", class: "secondary small", id: "audit-csv", onclick: () => download(form) }, "Export CSV"),
  );
  load(form, false);
  return h("section", { class: "panel", id: "audit" }, h("h2", {}, "Audit log"), form, list);
}

async function poll(container, el) {
  try {
    renderSummary(el, await api("/v1/admin/summary"));
  } catch (err) {
    if (err.status === 401 || err.status === 403) refused(container, err);
    else mount(el, notice(`Summary unavailable: ${err.message}`));
  }
}

function stopPolling() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

export async function show(container) {
  stopPolling();
  rates = [];
  const summary = h("div", { class: "body", id: "summary" }, "Loading…");
  const users = h("div", { class: "body" }, "Loading…");
  const usage = h("div", { class: "body" }, "Loading…");
  const teams = h("div", { class: "body" }, "Loading…");
  // The first call decides: a non-admin sees the refusal and nothing else.
  let first;
  try {
    first = await api("/v1/admin/summary");
  } catch (err) {
    refused(container, err);
    return;
  }
  mount(
    container,
    h(
      "div",
      { class: "admin" },
      h("section", { class: "panel", id: "summary-panel" }, h("h2", {}, "Live summary"), summary),
      h("section", { class: "panel", id: "users" }, h("h2", {}, "Users"), users),
      h("section", { class: "panel", id: "admin-teams" }, h("h2", {}, "Teams"), teams),
      h("section", { class: "panel", id: "admin-usage" }, h("h2", {}, "Usage across users (14 days)"), usage),
      auditPanel(),
    ),
  );
  renderSummary(summary, first);
  timer = setInterval(() => poll(container, summary), POLL_MS);
  const userList = api("/v1/admin/users?limit=500")
    .then((body) => (Array.isArray(body) ? body : body.data || []))
    .catch((err) => {
      mount(users, notice(`Could not list users: ${err.message}`));
      return null;
    });
  userList.then((list) => list && mount(users, usersTable(list)));
  api("/v1/admin/teams?limit=500")
    .then((body) => mount(teams, teamsList(body.data || [])))
    .catch((err) => mount(teams, notice(`Could not list teams: ${err.message}`)));
  const end = new Date();
  const start = new Date(end.getTime() - 13 * 86_400_000);
  const day = (d) => d.toISOString().slice(0, 10);
  const range = `start=${day(start)}&end=${day(end)}`;
  const byTeam = api(`/v1/admin/usage?${range}&group_by=day,team`);
  Promise.all([api(`/v1/admin/usage?${range}`), userList, byTeam])
    .then(([body, list, teams]) => {
      const rows = Array.isArray(body) ? body : body.data || [];
      const emails = new Map((list || []).map((u) => [u.id, u.email]));
      const { categories, series } = usageSeries(rows, 14);
      const spend = usageSeries(teams.data || [], 14, {
        value: spendOf,
        by: (row) => (row.team_id ? `team ${row.team_id.slice(0, 8)}` : "no team"),
      });
      mount(
        usage,
        stackedBars(categories, series, { title: "Tokens per day per model, all users" }),
        legend(series.map((x) => x.name)),
        h("h3", {}, "Spend per day per team (USD)"),
        stackedBars(spend.categories, spend.series, { title: "Spend per day per team (USD)" }),
        legend(spend.series.map((x) => x.name)),
        usageByUser(rows, emails),
      );
    })
    .catch((err) => mount(usage, notice(`Could not load usage: ${err.message}`)));
}

export function hide() {
  stopPolling();
}
