// The session and every call to the API.
//
// Token storage (docs/web.md): the short-lived JWT access token and a pasted API key live only in
// this module's memory, out of reach of storage-scraping code and gone when the tab closes. The
// refresh token is kept in sessionStorage (this tab only, never localStorage) so a reload does
// not sign the user out; refresh tokens rotate on every use and a reused one revokes its family,
// so a stolen copy is short-lived. No cookies are used, so there is no CSRF surface: every call
// carries `Authorization: Bearer` explicitly.

const REFRESH_KEY = "llm-api.refresh-token";

let credential = null; // { kind: "jwt" | "key", token: string }
let refreshing = null; // a pending refresh, shared by concurrent callers
let me = null; // GET /v1/users/me, cached per sign-in

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.type = err.type || null;
    this.code = err.code || null;
    this.param = err.param || null;
  }
}

function changed() {
  me = null;
  window.dispatchEvent(new CustomEvent("session-changed"));
}

export const session = {
  get signedIn() {
    return credential !== null;
  },
  get kind() {
    return credential ? credential.kind : null;
  },
};

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return new ApiError(response.status, body);
}

function storeTokens(body) {
  credential = { kind: "jwt", token: body.access_token };
  if (body.refresh_token) sessionStorage.setItem(REFRESH_KEY, body.refresh_token);
}

export async function signIn(email, password) {
  const form = new URLSearchParams({ username: email, password, grant_type: "password" });
  const response = await fetch("/v1/auth/token", {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: form,
  });
  if (!response.ok) throw await errorFrom(response);
  storeTokens(await response.json());
  changed();
}

/** What the sign-in page offers: single sign-on (a button) and/or the password form. */
export async function signInOptions() {
  try {
    const response = await fetch("/v1/auth/oidc");
    if (response.ok) return await response.json();
  } catch {
    // An older server or a network error: offer the password form only.
  }
  return { enabled: false, password_login_enabled: true };
}

/**
 * After the provider's redirect (`/#/sso`): collect the login the server made. Its refresh token
 * comes in an HttpOnly cookie sent only to this path, and is rotated here, so it works once.
 */
export async function completeSso() {
  const response = await fetch("/v1/auth/oidc/session", {
    method: "POST",
    headers: { "X-Requested-With": "llm-api" },
  });
  if (!response.ok) throw await errorFrom(response);
  storeTokens(await response.json());
  changed();
}

export async function useApiKey(key) {
  const token = key.trim();
  const response = await fetch("/v1/models", { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) throw await errorFrom(response);
  credential = { kind: "key", token };
  sessionStorage.removeItem(REFRESH_KEY);
  changed();
}

/** Trade the stored refresh token for a new pair. Returns false when there is none or it failed. */
export function refresh() {
  const stored = sessionStorage.getItem(REFRESH_KEY);
  if (!stored) return Promise.resolve(false);
  refreshing ??= (async () => {
    try {
      const response = await fetch("/v1/auth/refresh", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ refresh_token: stored }),
      });
      if (!response.ok) {
        sessionStorage.removeItem(REFRESH_KEY);
        credential = null;
        return false;
      }
      storeTokens(await response.json());
      return true;
    } catch {
      return false;
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

/** At page load: a refresh token in this tab restores the session. */
export async function restore() {
  if (await refresh()) changed();
}

export async function signOut() {
  const stored = sessionStorage.getItem(REFRESH_KEY);
  const token = credential && credential.kind === "jwt" ? credential.token : null;
  sessionStorage.removeItem(REFRESH_KEY);
  credential = null;
  if (stored && token) {
    try {
      await fetch("/v1/auth/logout", {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
        body: JSON.stringify({ refresh_token: stored }),
      });
    } catch {
      // Signing out locally is what matters; the refresh token expires on its own.
    }
  }
  changed();
}

/**
 * Call the API with the current credential. `json` is sent as the body; `raw` returns the
 * Response (for streams). A 401 on a JWT session triggers one refresh and one retry.
 */
export async function api(path, { method = "GET", json, signal, raw = false } = {}) {
  const send = () => {
    const headers = {};
    if (credential) headers.Authorization = `Bearer ${credential.token}`;
    if (json !== undefined) headers["Content-Type"] = "application/json";
    return fetch(path, {
      method,
      headers,
      signal,
      body: json === undefined ? undefined : JSON.stringify(json),
    });
  };
  let response = await send();
  if (response.status === 401 && session.kind === "jwt" && (await refresh())) {
    response = await send();
  }
  if (!response.ok) throw await errorFrom(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** The signed-in user (cached), or null with an API key that may not read it. */
export async function currentUser() {
  if (!credential) return null;
  if (me === null) {
    try {
      me = await api("/v1/users/me");
    } catch (err) {
      if (err.status === 401 || err.status === 403 || err.status === 404) return null;
      throw err;
    }
  }
  return me;
}
