// treewave: the page shown while the balancer requires its API token for reads. It asks
// for the token (or uses the one this tab kept), opens a read session with it
// (POST /api/session answers with an HttpOnly cookie) and loads the status page again.
// Plain ES2017, no dependencies, no build step.
(function () {
  "use strict";

  const TOKEN_KEY = "treewave.apiToken"; // shared with status.js (its buttons send it)
  const OPENED_KEY = "treewave.sessionOpenedAt";
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const hint = document.getElementById("token-hint");

  function stored(key) {
    try { return sessionStorage.getItem(key) || ""; } catch (_) { return ""; }
  }

  function store(key, value) {
    try {
      if (value) sessionStorage.setItem(key, value);
      else sessionStorage.removeItem(key);
    } catch (_) { /* storage disabled: asked again next time */ }
  }

  function ask(message) {
    hint.textContent = message;
    input.value = "";
    form.hidden = false;
    input.focus();
  }

  async function openSession(token, asked) {
    let resp;
    try {
      resp = await fetch("/api/session", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Accept: "application/json",
          Authorization: "Bearer " + token,
        },
        body: "{}",
        credentials: "same-origin",
      });
    } catch (err) {
      ask(`Cannot reach the balancer (${err.message}); enter the API token to try again.`);
      return;
    }
    if (resp.ok) {
      store(TOKEN_KEY, token);
      store(OPENED_KEY, String(Date.now()));
      window.location.reload();
      return;
    }
    let detail = "";
    try { detail = (await resp.json()).error || ""; } catch (_) { detail = ""; }
    if (resp.status === 401) {
      store(TOKEN_KEY, "");
      ask(asked
        ? "The balancer did not accept that token; enter its API token."
        : "This balancer needs its API token to show the cluster.");
      return;
    }
    ask(`Could not open a session (HTTP ${resp.status}): ${detail}`);
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (token) openSession(token, true);
  });

  // A token this tab kept opens the session without asking, unless one was opened moments
  // ago and the page is still locked: then the cookie did not come back, and asking again
  // (rather than reloading in a loop) lets the user see why.
  const token = stored(TOKEN_KEY);
  const openedAgo = Date.now() - (parseInt(stored(OPENED_KEY), 10) || 0);
  if (token && openedAgo > 10000) {
    openSession(token, false);
  } else if (token) {
    ask("Still locked after opening a session: this browser may not keep the session " +
      "cookie (allow cookies for this address), or the token has changed. Enter the API token.");
  } else {
    ask("This balancer needs its API token to show the cluster.");
  }
})();
