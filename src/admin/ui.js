// keyward dashboard: reads the admin API with the admin token and draws the tables.
// The token comes from the URL fragment (#token=..., never sent to the server), from this tab's
// sessionStorage, or from the sign-in form. A token the API refuses is dropped and the form asks
// again, so a typo can be corrected. All data is inserted as text.
"use strict";

const TOKEN_KEY = "keyward-admin-token";
const fragment = new URLSearchParams(location.hash.slice(1));
let token = fragment.get("token") || sessionStorage.getItem(TOKEN_KEY) || "";
if (fragment.has("token")) history.replaceState(null, "", location.pathname);

class HttpError extends Error {
  constructor(path, status) {
    super(path + " answered " + status);
    this.status = status;
  }
}

async function get(path) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + token } });
  if (!response.ok) throw new HttpError(path, response.status);
  return response;
}

// Shows the sign-in form (with `message`, if any) instead of the dashboard.
function askForToken(message) {
  token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("dashboard").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  const input = document.getElementById("token");
  input.value = "";
  input.focus();
  document.body.dataset.loaded = "login";
}

function row(table, cells, header) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement(header ? "th" : "td");
    td.textContent = cell === null || cell === undefined ? "-" : String(cell);
    tr.appendChild(td);
  }
  table.appendChild(tr);
  return tr;
}

function heat(table, data) {
  table.textContent = "";
  const names = Object.keys(data);
  row(table, [""].concat([...Array(24).keys()].map((h) => String(h).padStart(2, "0"))), true);
  const max = Math.max(1, ...names.flatMap((n) => data[n]));
  for (const name of names) {
    const tr = row(table, [name].concat(data[name]));
    [...tr.children].slice(1).forEach((td, hour) => {
      const n = data[name][hour];
      td.className = "cell";
      td.title = name + " " + hour + ":00 UTC: " + n;
      td.style.background = n ? "rgba(207, 34, 46, " + (0.15 + 0.85 * n / max).toFixed(2) + ")" : "#f6f8fa";
    });
  }
  if (!names.length) row(table, ["no credential use in this period"]);
}

// Empties `table`, keeping its header row.
function clear(table) {
  while (table.rows.length > 1) table.deleteRow(1);
}

async function load() {
  document.body.dataset.loaded = "loading";
  const summary = await (await get("/admin/audit/summary?since=7d")).json();
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("login").hidden = true;
  document.getElementById("dashboard").hidden = false;
  document.getElementById("error").textContent = "";
  heat(document.getElementById("heat-agent"), summary.heatmap.by_agent);
  heat(document.getElementById("heat-credential"), summary.heatmap.by_credential);
  const secrets = await (await get("/admin/secrets")).json();
  const table = document.getElementById("secrets");
  clear(table);
  for (const s of secrets.secrets) {
    // A minted kind holds a token per grant scope: the soonest expiry is shown; a signing kind
    // shows the service and region it signs for.
    const minted = (s.minted || []).map((m) => m.expires_at).filter(Boolean).sort()[0] || "";
    const kind = s.signing ? s.kind + " (" + s.signing.service + ", " + s.signing.region + ")" : s.kind;
    row(table, [s.name, kind, s.source, s.version, s.fetched_at, s.expires_at, minted, s.next_rotation || s.rotation]);
  }
  const list = document.getElementById("anomalies");
  list.textContent = "";
  for (const a of summary.anomalies) {
    const li = document.createElement("li");
    li.textContent = a.timestamp + " " + a.type + " " + (a.agentId || "");
    list.appendChild(li);
  }
  for (const q of summary.quarantined) {
    const li = document.createElement("li");
    li.textContent = "quarantined: " + q;
    list.appendChild(li);
  }
  if (!list.children.length) list.textContent = "none";
  const budgets = await (await get("/admin/budgets")).json();
  const burn = document.getElementById("budgets");
  clear(burn);
  for (const b of budgets.budgets) {
    for (const a of b.accounts) {
      const of = (x) => (x ? x.used + " / " + x.limit : "-");
      const tr = row(burn, [b.name + (b.mode === "shadow" ? " (shadow)" : ""), a.holder, b.window.kind,
        of(a.tokens), of(a.costUsd), Math.round(100 * a.burn) + "%"]);
      const cell = tr.lastChild;
      cell.className = "cell";
      cell.style.background = "linear-gradient(90deg, rgba(207, 34, 46, 0.6) " + Math.min(100, 100 * a.burn).toFixed(0) + "%, #f6f8fa 0)";
    }
  }
  if (burn.rows.length === 1) row(burn, ["no budgets configured"]);
  const spend = document.getElementById("spend");
  clear(spend);
  for (const [agent, s] of Object.entries(summary.spend)) {
    row(spend, [agent, s.calls, s.tokens, s.cost_usd.toFixed(6), s.unreported]);
  }
  if (spend.rows.length === 1) row(spend, ["no metered calls in this period"]);
  const shadow = document.getElementById("would-deny");
  clear(shadow);
  for (const [agent, policies] of Object.entries(summary.would_deny)) {
    for (const [policy, n] of Object.entries(policies)) row(shadow, [agent, policy, n]);
  }
  if (shadow.rows.length === 1) row(shadow, ["none"]);
  const e = summary.endings;
  row(document.getElementById("endings"), [e.upstream, e.agent, e.keyward, e.before_head]);
  const denials = document.getElementById("denials");
  clear(denials);
  for (const d of summary.recent_denials) {
    row(denials, [d.timestamp, d.agentId, d.operation, d.status, d.errorCode]);
  }
  document.body.dataset.loaded = "true";
}

document.getElementById("report").addEventListener("click", async () => {
  const html = await (await get("/admin/report?since=7d&format=html")).text();
  const url = URL.createObjectURL(new Blob([html], { type: "text/html" }));
  window.open(url, "_blank");
});

function start() {
  load().catch((e) => {
    if (e.status === 401) {
      askForToken("The admin token was not accepted (401). Check it and enter it again.");
      return;
    }
    document.getElementById("error").textContent = e.message;
    document.body.dataset.loaded = "error";
  });
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value.trim();
  if (!token) return;
  document.getElementById("login-error").textContent = "";
  start();
});

document.getElementById("signout").addEventListener("click", () => askForToken(""));

if (token) start();
else askForToken("");
