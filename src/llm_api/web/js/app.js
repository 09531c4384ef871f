// Entry point: hash routing between the sign-in page, the playground, the account pages and the
// admin pages. One page, so `/` is the only HTML route the server serves.

import * as accountView from "./account.js";
import * as adminView from "./admin.js";
import {
  completeSso,
  currentUser,
  restore,
  session,
  signIn,
  signInOptions,
  signOut,
  useApiKey,
} from "./api.js";
import { $, h, mount, notice } from "./dom.js";
import * as playgroundView from "./playground.js";

const views = { playground: playgroundView, account: accountView, admin: adminView };
let current = null;
let ssoFailure = null; // why the last single sign-on could not be collected

function ssoPanel(options) {
  return h(
    "div",
    { class: "panel", id: "sso-panel" },
    h("h2", {}, "Single sign-on"),
    // A plain link: the browser navigates to the server, which redirects to the provider.
    h("a", { class: "button", id: "sso-button", href: options.login_url }, options.button_label),
  );
}

async function signInView(container) {
  const options = await signInOptions();
  const status = h("div", { id: "signin-status" });
  const pending = (form, busy) => {
    for (const el of form.querySelectorAll("button, input")) el.disabled = busy;
  };
  const done = () => {
    location.hash = sessionStorage.getItem("llm-api.after-signin") || "#/playground";
    sessionStorage.removeItem("llm-api.after-signin");
  };
  mount(
    container,
    h(
      "div",
      { class: "signin" },
      options.enabled ? ssoPanel(options) : null,
      !options.password_login_enabled ? null : h(
        "form",
        {
          class: "panel",
          id: "password-form",
          onsubmit: async (event) => {
            event.preventDefault();
            const form = event.currentTarget;
            pending(form, true);
            try {
              await signIn($("#email", form).value, $("#password", form).value);
              done();
            } catch (err) {
              mount(status, notice(`Sign-in failed: ${err.message}`));
            } finally {
              pending(form, false);
            }
          },
        },
        h("h2", {}, "Sign in"),
        h("label", { for: "email" }, "Email"),
        h("input", { id: "email", type: "email", autocomplete: "username", required: true }),
        h("label", { for: "password" }, "Password"),
        h("input", { id: "password", type: "password", autocomplete: "current-password", required: true }),
        h("button", { type: "submit", id: "signin-submit" }, "Sign in"),
      ),
      h(
        "form",
        {
          class: "panel",
          id: "key-form",
          onsubmit: async (event) => {
            event.preventDefault();
            const form = event.currentTarget;
            pending(form, true);
            try {
              await useApiKey($("#api-key", form).value);
              done();
            } catch (err) {
              mount(status, notice(`That key was refused: ${err.message}`));
            } finally {
              pending(form, false);
            }
          },
        },
        h("h2", {}, "Or use an API key"),
        h("label", { for: "api-key" }, "API key"),
        h("input", { id: "api-key", type: "password", autocomplete: "off", required: true, placeholder: "sk-…" }),
        h("p", { class: "muted" }, "The key stays in this tab's memory only; reloading asks again."),
        h("button", { type: "submit", id: "key-submit" }, "Use key"),
      ),
      status,
    ),
  );
  if (ssoFailure) {
    mount(status, notice(`Single sign-on failed: ${ssoFailure}`));
    ssoFailure = null;
  }
}

async function renderNav() {
  const nav = $("#nav");
  const who = $("#who");
  if (!session.signedIn) {
    mount(nav);
    mount(who);
    return;
  }
  const user = await currentUser().catch(() => null);
  const links = [
    ["playground", "Playground"],
    ["account", "Account"],
  ];
  if (user && user.role === "admin") links.push(["admin", "Admin"]);
  const route = routeName();
  mount(
    nav,
    links.map(([name, label]) =>
      h("a", { href: `#/${name}`, class: name === route ? "active" : null, id: `nav-${name}` }, label),
    ),
  );
  mount(
    who,
    h("span", { class: "muted", id: "who-name" }, user ? user.email : "API key"),
    h("button", { class: "secondary small", id: "signout", onclick: () => signOut() }, "Sign out"),
  );
}

function routeName() {
  const name = location.hash.replace(/^#\/?/, "") || "playground";
  return name in views || name === "signin" ? name : "playground";
}

function route() {
  const main = $("#main");
  const name = routeName();
  if (current && current !== views[name]) current.hide();
  current = null;
  if (!session.signedIn || name === "signin") {
    if (name !== "signin") sessionStorage.setItem("llm-api.after-signin", `#/${name}`);
    signInView(main);
  } else {
    current = views[name];
    current.show(main);
  }
  renderNav();
}

window.addEventListener("hashchange", route);
window.addEventListener("session-changed", () => {
  if (!session.signedIn) location.hash = "#/signin";
  route();
});

async function start() {
  if (location.hash === "#/sso") {
    // Back from the provider: collect the login, then continue where sign-in was asked for.
    history.replaceState(null, "", sessionStorage.getItem("llm-api.after-signin") || "#/playground");
    sessionStorage.removeItem("llm-api.after-signin");
    try {
      await completeSso();
      return;
    } catch (err) {
      ssoFailure = err.message;
    }
  }
  await restore();
}

start().finally(route);
