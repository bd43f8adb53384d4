// The checkout page: fetches the vault's sealing key from the shop's backend, seals the
// card in this browser (clients/web/sealer.js) and posts only the sealed card.

import { SealerError, createSealer } from "/sealer.js";

const $ = (id) => document.getElementById(id);

// Words for the fields the sealer and the vault name in their refusals.
const FIELD_NAMES = {
  "card.number": "card number",
  "card.exp_month": "expiry month",
  "card.exp_year": "expiry year",
  "card.cvc": "CVC",
  "card.name": "name on card",
};

let key = null; // { sealer, loadedAt, maxAgeMs }

function setState(state, status) {
  document.body.dataset.state = state;
  $("status").textContent = status;
}

function showError(message) {
  $("result").hidden = true;
  $("error").textContent = message;
  $("error").hidden = false;
}

async function getJson(response) {
  try {
    return await response.json();
  } catch {
    return {};
  }
}

async function loadKey() {
  const response = await fetch("/api/sealing-key", { cache: "no-store" });
  const body = await getJson(response);
  if (!response.ok) {
    throw new Error(`Cannot get the vault's key: ${body.error ?? `HTTP ${response.status}`}`);
  }
  key = {
    sealer: await createSealer({
      publicKey: body.public_key,
      keyId: body.key_id,
      tenant: body.tenant,
      serverTimeUnixMs: body.server_time_unix_ms,
    }),
    loadedAt: performance.now(),
    maxAgeMs: (body.max_age_secs || 600) * 1000,
  };
}

// "MM/YY", "MM/YYYY", "MM YY" or "MMYY".
function parseExpiry(text) {
  const match = /^\s*(\d{1,2})\s*[/ -]?\s*(\d{2}|\d{4})\s*$/.exec(text);
  if (!match) {
    return null;
  }
  const year = Number(match[2]);
  return { exp_month: Number(match[1]), exp_year: year < 100 ? 2000 + year : year };
}

function readCard() {
  const expiry = parseExpiry($("expiry").value);
  if (!expiry) {
    throw new SealerError("card.exp_month", "format");
  }
  return {
    number: $("number").value.trim(),
    ...expiry,
    cvc: $("cvc").value.trim(),
    name: $("name").value.trim(),
  };
}

async function pay(card) {
  // A key held for more than half the vault's window is fetched again first.
  if (performance.now() - key.loadedAt > key.maxAgeMs / 2) {
    await loadKey();
  }
  for (let attempt = 0; ; attempt++) {
    const sealedCard = await key.sealer.seal(card);
    const response = await fetch("/api/pay", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ sealed_card: sealedCard }),
    });
    const body = await getJson(response);
    if (response.ok) {
      return body;
    }
    // The key was rotated away or the stamp is too old: a new key, sealed again, once.
    if (body.retry_with_new_key && attempt === 0) {
      await loadKey();
      continue;
    }
    throw new Error(`Payment refused: ${body.error ?? `HTTP ${response.status}`}`);
  }
}

$("pay-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("pay").disabled = true;
  $("error").hidden = true;
  $("result").hidden = true;
  setState("paying", "Encrypting the card and paying...");
  try {
    const stored = await pay(readCard());
    $("brand").textContent = stored.brand;
    $("last-four").textContent = stored.last_four;
    $("token").textContent = stored.token;
    $("result").hidden = false;
    // Paid: the number and CVC need not stay in the page.
    $("number").value = "";
    $("cvc").value = "";
    setState("paid", "Paid.");
  } catch (error) {
    const message =
      error instanceof SealerError
        ? `Please check the ${FIELD_NAMES[error.field] ?? error.field} (${error.rule}).`
        : error.message;
    showError(message);
    setState("error", "");
  } finally {
    $("pay").disabled = false;
  }
});

loadKey().then(
  () => {
    $("pay").disabled = false;
    setState("ready", "Ready.");
  },
  (error) => {
    showError(error.message);
    setState("error", "");
  },
);
