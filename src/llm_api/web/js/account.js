// Account pages: one's API keys (created keys are shown once, each with its scopes and controls:
// model allow-list, expiry, client IPs), one's teams with their members and keys, usage as a
// chart of tokens per day per model, and the current rate-limit standing.

import { api, currentUser } from "./api.js";
import { legend, stackedBars } from "./chart.js";
import { $, fmtDate, fmtInt, h, mount, notice } from "./dom.js";

const USAGE_DAYS = 14;
// A new key's scopes (docs/security.md, "API key scopes"): inference is the default; the server
// refuses any scope the signed-in credential does not hold, and `admin` is for administrators.
const KEY_SCOPES = ["inference", "keys", "account", "teams", "admin"];

/** "a, b c" → ["a", "b", "c"]; empty → undefined (the field is left out: no restriction). */
function listField(value) {
  const items = value.split(/[\s,]+/).filter(Boolean);
  return items.length ? items : undefined;
}

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

const tokensOf = (row) =>
  row.total_tokens ?? (row.prompt_tokens || 0) + (row.completion_tokens || 0);
/** A row's spend in USD (`cost_usd` is an exact decimal string). */
export const spendOf = (row) => Number(row.cost_usd || 0);

/**
 * Rows of `GET /v1/usage` → categories (days) and one series per `by` (the model, by default)
 * of `value` (tokens, by default; `spendOf` for USD).
 */
export function usageSeries(rows, days, { value = tokensOf, by = (row) => row.model || "unknown" } = {}) {
  const end = new Date();
  const categories = [];
  for (let i = days - 1; i >= 0; i -= 1) {
    categories.push(isoDay(new Date(end.getTime() - i * 86_400_000)));
  }
  const byModel = new Map();
  for (const row of rows) {
    const day = String(row.date ?? row.day ?? "").slice(0, 10);
    const index = categories.indexOf(day);
    if (index === -1) continue;
    const name = by(row);
    if (!byModel.has(name)) byModel.set(name, new Array(categories.length).fill(0));
    byModel.get(name)[index] += value(row);
  }
  const series = [...byModel.entries()].map(([name, values]) => ({ name, values }));
  return { categories, series };
}

function usageRows(body) {
  if (Array.isArray(body)) return body;
  return body.data || body.rows || body.usage || [];
}

function profile(user) {
  if (!user) return notice("Signed in with an API key: sign in with a password to see your profile.", "info");
  return h(
    "dl",
    { class: "facts", id: "profile" },
    h("dt", {}, "Email"),
    h("dd", {}, user.email),
    h("dt", {}, "Tier"),
    h("dd", {}, user.tier),
    h("dt", {}, "Role"),
    h("dd", {}, user.role),
  );
}

async function renderKeys(section) {
  const body = $(".body", section);
  try {
    const list = await api("/v1/keys");
    const keys = (Array.isArray(list) ? list : list.data || []).filter((k) => !k.revoked_at);
    if (keys.length === 0) {
      mount(body, h("p", { class: "muted" }, "No API keys yet."));
      return;
    }
    mount(
      body,
      h(
        "table",
        { id: "keys-table" },
        h(
          "thead",
          {},
          h("tr", {}, ["Name", "Key", "Scopes", "Models", "Expires", "Created", ""].map((t) => h("th", {}, t))),
        ),
        h(
          "tbody",
          {},
          keys.map((key) =>
            h(
              "tr",
              { dataset: { keyId: key.id } },
              h("td", {}, key.name || "—"),
              h("td", {}, h("code", {}, `${key.prefix || key.display_prefix || ""}…`)),
              h("td", { class: "scopes" }, (key.scopes || []).join(", ") || "—"),
              h("td", { class: "models" }, key.models ? key.models.join(", ") : "all"),
              h("td", { class: "expires" }, key.expires_at ? fmtDate(key.expires_at) : "never"),
              h("td", {}, fmtDate(key.created_at)),
              h(
                "td",
                {},
                h(
                  "button",
                  {
                    class: "danger small revoke",
                    onclick: async (event) => {
                      event.target.disabled = true;
                      try {
                        await api(`/v1/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
                      } catch (err) {
                        body.prepend(notice(`Could not revoke: ${err.message}`));
                      }
                      renderKeys(section);
                    },
                  },
                  "Revoke",
                ),
              ),
            ),
          ),
        ),
      ),
    );
  } catch (err) {
    mount(body, notice(`Could not list keys: ${err.message}`));
  }
}

function keysSection() {
  const section = h(
    "section",
    { class: "panel", id: "keys" },
    h("h2", {}, "API keys"),
    h(
      "form",
      {
        class: "inline",
        id: "create-key",
        onsubmit: async (event) => {
          event.preventDefault();
          const name = $("#key-name", section).value.trim() || "playground";
          const shown = $("#new-key", section);
          try {
            const scopes = KEY_SCOPES.filter((s) => $(`#scope-${s}`, section).checked);
            const json = { name, scopes };
            const models = listField($("#key-models", section).value);
            const ips = listField($("#key-ips", section).value);
            const expires = $("#key-expires", section).value; // YYYY-MM-DD, end of that UTC day
            if (models) json.models = models;
            if (ips) json.allowed_ips = ips;
            if (expires) json.expires_at = `${expires}T23:59:59Z`;
            const created = await api("/v1/keys", { method: "POST", json });
            const secret = created.key || created.api_key || created.secret;
            mount(
              shown,
              h("p", {}, "Copy this key now: it is shown only once."),
              h("code", { id: "new-key-value", class: "secret" }, secret),
              h(
                "button",
                {
                  type: "button",
                  class: "secondary small",
                  onclick: () => navigator.clipboard && navigator.clipboard.writeText(secret),
                },
                "Copy",
              ),
            );
            for (const id of ["#key-name", "#key-models", "#key-ips", "#key-expires"]) $(id, section).value = "";
          } catch (err) {
            mount(shown, notice(`Could not create a key: ${err.message}`));
          }
          renderKeys(section);
        },
      },
      h("label", { for: "key-name" }, "Name"),
      h("input", { id: "key-name", maxlength: 100, placeholder: "my-script" }),
      h("label", { for: "key-models" }, "Models"),
      h("input", { id: "key-models", placeholder: "all, or e.g. smollm2-*" }),
      h("label", { for: "key-expires" }, "Expires"),
      h("input", { id: "key-expires", type: "date" }),
      h("label", { for: "key-ips" }, "Client IPs"),
      h("input", { id: "key-ips", placeholder: "any, or e.g. 10.0.0.0/8" }),
      KEY_SCOPES.map((s) =>
        h(
          "label",
          { class: "scope", id: `scope-label-${s}`, hidden: s === "admin" },
          h("input", { type: "checkbox", id: `scope-${s}`, checked: s === "inference" }),
          ` ${s}`,
        ),
      ),
      h("button", { type: "submit" }, "Create key"),
    ),
    h("div", { id: "new-key", class: "once" }),
    h("div", { class: "body" }),
  );
  currentUser()
    .then((user) => {
      if (user && user.role === "admin") $("#scope-label-admin", section).hidden = false;
    })
    .catch(() => {});
  renderKeys(section);
  return section;
}

function teamTable(team) {
  return h(
    "div",
    { class: "team", dataset: { teamId: team.id } },
    h("h3", {}, `${team.name} `, h("span", { class: "muted" }, `(${team.role || "—"})`)),
    h(
      "table",
      { class: "team-members" },
      h("thead", {}, h("tr", {}, ["Member", "Role"].map((t) => h("th", {}, t)))),
      h(
        "tbody",
        {},
        team.members.map((m) => h("tr", {}, h("td", {}, m.email), h("td", { class: "role" }, m.role))),
      ),
    ),
    team.keys.length
      ? h(
          "table",
          { class: "team-keys" },
          h("thead", {}, h("tr", {}, ["Team key", "Key", "Models", "Expires"].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            team.keys.map((k) =>
              h(
                "tr",
                {},
                h("td", {}, k.name || "—"),
                h("td", {}, h("code", {}, `${k.prefix}…`)),
                h("td", {}, k.models ? k.models.join(", ") : "all"),
                h("td", {}, k.expires_at ? fmtDate(k.expires_at) : "never"),
              ),
            ),
          ),
        )
      : h("p", { class: "muted" }, "No team keys."),
  );
}

/** Teams with their members and keys (also used by the admin page). */
export function teamsList(teams) {
  if (teams.length === 0) return h("p", { class: "muted" }, "No teams.");
  return h("div", { class: "teams" }, teams.map(teamTable));
}

async function renderTeams(body) {
  try {
    const list = await api("/v1/teams");
    const teams = list.data || [];
    mount(body, teamsList(teams));
    // Each team's usage (its keys', last 30 days): every member may see it.
    for (const team of teams) {
      api(`/v1/teams/${encodeURIComponent(team.id)}/usage`)
        .then((usage) => {
          const el = body.querySelector(`[data-team-id="${CSS.escape(team.id)}"] h3`);
          const t = usage.totals;
          if (el) el.after(h("p", { class: "muted team-usage" }, `${fmtInt(t.requests)} requests, ${fmtInt(t.total_tokens)} tokens with the team's keys in the last 30 days.`));
        })
        .catch(() => {});
    }
  } catch (err) {
    mount(body, notice(`Could not list teams: ${err.message}`));
  }
}

function teamsSection() {
  const body = h("div", { class: "body" });
  const section = h(
    "section",
    { class: "panel", id: "teams" },
    h("h2", {}, "Teams"),
    h(
      "form",
      {
        class: "inline",
        id: "create-team",
        onsubmit: async (event) => {
          event.preventDefault();
          const name = $("#team-name", section).value.trim();
          if (!name) return;
          try {
            await api("/v1/teams", { method: "POST", json: { name } });
            $("#team-name", section).value = "";
          } catch (err) {
            body.prepend(notice(`Could not create the team: ${err.message}`));
            return;
          }
          renderTeams(body);
        },
      },
      h("label", { for: "team-name" }, "New team"),
      h("input", { id: "team-name", maxlength: 100, placeholder: "research" }),
      h("button", { type: "submit" }, "Create team"),
    ),
    body,
  );
  renderTeams(body);
  return section;
}

async function renderUsage(body) {
  const end = new Date();
  const start = new Date(end.getTime() - (USAGE_DAYS - 1) * 86_400_000);
  try {
    const data = await api(`/v1/usage?start=${isoDay(start)}&end=${isoDay(end)}`);
    const rows = usageRows(data);
    const { categories, series } = usageSeries(rows, USAGE_DAYS);
    const total = series.reduce((sum, x) => sum + x.values.reduce((a, b) => a + b, 0), 0);
    const spend = usageSeries(rows, USAGE_DAYS, { value: spendOf });
    const spent = rows.reduce((sum, row) => sum + spendOf(row), 0);
    mount(
      body,
      h("p", {}, `${fmtInt(total)} tokens in the last ${USAGE_DAYS} days.`),
      stackedBars(categories, series, { title: "Tokens per day per model" }),
      legend(series.map((x) => x.name)),
      h("h3", {}, "Spend"),
      h("p", { id: "spend-total" }, `$${spent.toFixed(4)} in the last ${USAGE_DAYS} days.`),
      stackedBars(spend.categories, spend.series, { title: "Spend per day per model (USD)" }),
      legend(spend.series.map((x) => x.name)),
    );
  } catch (err) {
    mount(body, notice(`Could not load usage: ${err.message}`));
  }
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.ceil(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return s % 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s / 60} min`;
  const m = Math.round((s % 3600) / 60);
  return m ? `${Math.floor(s / 3600)} h ${m} min` : `${Math.floor(s / 3600)} h`;
}

async function renderLimits(body) {
  try {
    const standing = await api("/v1/users/me/limits");
    mount(
      body,
      h("p", { class: "muted" }, `Tier: ${standing.tier}`),
      h(
        "table",
        { id: "limits-table" },
        h("thead", {}, h("tr", {}, ["Limit", "Used", "Remaining", "Of", "Resets in"].map((t) => h("th", {}, t)))),
        h(
          "tbody",
          {},
          standing.limits.map((l) =>
            h(
              "tr",
              {},
              h("td", {}, l.description || l.name),
              h("td", {}, l.limit === null ? "—" : fmtInt(l.limit - l.remaining)),
              h("td", {}, l.remaining === null ? "unlimited" : fmtInt(l.remaining)),
              h("td", {}, l.limit === null ? "—" : fmtInt(l.limit)),
              h("td", {}, duration(l.reset_seconds)),
            ),
          ),
        ),
      ),
    );
  } catch (err) {
    mount(body, notice(`Could not load your rate limits: ${err.message}`));
  }
}

export async function show(container) {
  const usage = h("div", { class: "body" });
  const limits = h("div", { class: "body" });
  const who = h("div", {});
  mount(
    container,
    h(
      "div",
      { class: "account" },
      h("section", { class: "panel", id: "profile-panel" }, h("h2", {}, "Profile"), who),
      h("section", { class: "panel", id: "limits" }, h("h2", {}, "Rate limits"), limits),
      keysSection(),
      teamsSection(),
      h("section", { class: "panel", id: "usage" }, h("h2", {}, "Usage"), usage),
    ),
  );
  currentUser()
    .then((user) => mount(who, profile(user)))
    .catch((err) => mount(who, notice(err.message)));
  renderUsage(usage);
  renderLimits(limits);
}

export function hide() {}
