// Seals a card in the customer's browser to the vault's intake key, so that the
// merchant's servers relay ciphertext and never hold the card (docs/sealed-intake.md).
//
// HPKE (RFC 9180) base mode, single shot, one suite: DHKEM(X25519, HKDF-SHA256),
// HKDF-SHA256, AES-256-GCM, on @hpke/core (WebCrypto). The byte layout:
//
//   offset  size  field
//        0     1  format, 0x01
//        1     8  key id (first 8 bytes of SHA-256(public key))
//        9     8  issued at, ms since the Unix epoch, big-endian (the vault's clock)
//       17    16  nonce, random per sealed card
//       33    32  enc (HPKE's encapsulated key)
//       65  n+16  ciphertext of the card JSON (AES-256-GCM, tag at the end)
//
// aad = bytes 0..33; info = "tokenvault/sealed-card/v1" 0x00 key_id tenant.
//
// No network calls here: the page gets the key from its own backend (which calls
// GetSealingKey) and posts the sealed card back to it. Errors name the field and the
// rule, never a value the customer typed.
//
// When changing this: the Rust reference is envelope/src/sealed.rs; both must keep
// reproducing the test vector of docs/sealed-intake.md (test/sealer.test.js).

import {
  Aes256Gcm,
  CipherSuite,
  DhkemX25519HkdfSha256,
  HkdfSha256,
} from "@hpke/core";

export const FORMAT_V1 = 1;
export const KEY_ID_LEN = 8;
export const NONCE_LEN = 16;
export const PUBLIC_KEY_LEN = 32;
export const HEADER_LEN = 1 + KEY_ID_LEN + 8 + NONCE_LEN;
export const MAX_PLAINTEXT_LEN = 1024;
export const INFO_LABEL = "tokenvault/sealed-card/v1";

/** A card or key that cannot be sealed: `field` and `rule` say why (no values). */
export class SealerError extends Error {
  constructor(field, rule) {
    super(`${field}: ${rule}`);
    this.name = "SealerError";
    this.field = field;
    this.rule = rule;
  }
}

/** The HPKE suite of sealed cards. `kem` replaces WebCrypto's X25519 (see README). */
export function createSuite(kem = new DhkemX25519HkdfSha256()) {
  return new CipherSuite({ kem, kdf: new HkdfSha256(), aead: new Aes256Gcm() });
}

/**
 * Makes a sealer for the key the backend got from GetSealingKey.
 *
 * @param {object} options
 * @param {Uint8Array|string} options.publicKey 32 bytes, or their base64url
 * @param {Uint8Array|string} options.keyId 8 bytes, or their base64url
 * @param {string} options.tenant the tenant bound into HPKE's info
 * @param {number} options.serverTimeUnixMs the vault's clock when the key was handed out
 * @param {object} [options.kem] a KEM object to use instead of @hpke/core's
 *   WebCrypto X25519 (e.g. `new DhkemX25519HkdfSha256()` from @hpke/dhkem-x25519)
 * @returns {Promise<{seal: (card: object) => Promise<string>, keyId: Uint8Array, tenant: string}>}
 */
export async function createSealer({ publicKey, keyId, tenant, serverTimeUnixMs, kem }) {
  // The vault's clock, carried forward with our own monotonic one: the device's
  // wall clock is often off, and may jump while the page is open.
  const startedAt = performance.now();
  if (!Number.isSafeInteger(serverTimeUnixMs) || serverTimeUnixMs < 0) {
    throw new SealerError("serverTimeUnixMs", "range");
  }
  const prepared = await prepare({ publicKey, keyId, tenant, kem });
  return {
    keyId: prepared.keyId,
    tenant,
    /** Seals `card`; resolves to the sealed card, base64url without padding. */
    async seal(card) {
      const elapsed = Math.max(0, Math.floor(performance.now() - startedAt));
      const nonce = crypto.getRandomValues(new Uint8Array(NONCE_LEN));
      const sealed = await sealWith(prepared, card, serverTimeUnixMs + elapsed, nonce);
      return base64urlEncode(sealed);
    },
  };
}

/**
 * TEST ONLY: seals with a given ephemeral key (`ikmE`, fed to DeriveKeyPair as RFC
 * 9180's own vectors do), nonce and issued-at, to reproduce the test vectors. A real
 * sealer must draw a fresh ephemeral key and nonce for every card: never ship a call
 * to this.
 *
 * @returns {Promise<Uint8Array>} the sealed card's bytes
 */
export async function sealDeterministicForTests({
  publicKey,
  keyId,
  tenant,
  kem,
  card,
  issuedAtUnixMs,
  nonce,
  ikmE,
}) {
  const prepared = await prepare({ publicKey, keyId, tenant, kem });
  return sealWith(prepared, card, issuedAtUnixMs, bytes(nonce, "nonce", NONCE_LEN), ikmE);
}

/** The card as the JSON object docs/sealed-intake.md specifies, keys in its order. */
export function cardJson(card) {
  if (card === null || typeof card !== "object") {
    throw new SealerError("card", "required");
  }
  const out = {};
  if (typeof card.number !== "string" || card.number.length === 0) {
    throw new SealerError("card.number", "required");
  }
  if (!/^[0-9 -]+$/.test(card.number) || card.number.length > 64) {
    throw new SealerError("card.number", "format");
  }
  out.number = card.number;
  out.exp_month = integerField(card.exp_month, "card.exp_month", 1, 12);
  out.exp_year = integerField(card.exp_year, "card.exp_year", 1000, 9999);
  if (card.cvc !== undefined && card.cvc !== null && card.cvc !== "") {
    if (typeof card.cvc !== "string" || !/^[0-9]{3,4}$/.test(card.cvc)) {
      throw new SealerError("card.cvc", "format");
    }
    out.cvc = card.cvc;
  }
  if (card.name !== undefined && card.name !== null && card.name !== "") {
    if (typeof card.name !== "string") {
      throw new SealerError("card.name", "format");
    }
    if ([...card.name].length > 128) {
      throw new SealerError("card.name", "too_long");
    }
    out.name = card.name;
  }
  return JSON.stringify(out);
}

/** HPKE's info for a tenant and key id. */
export function info(tenant, keyId) {
  const label = new TextEncoder().encode(INFO_LABEL);
  const tenantBytes = new TextEncoder().encode(tenant);
  const out = new Uint8Array(label.length + 1 + KEY_ID_LEN + tenantBytes.length);
  out.set(label, 0);
  out[label.length] = 0;
  out.set(keyId, label.length + 1);
  out.set(tenantBytes, label.length + 1 + KEY_ID_LEN);
  return out;
}

/** The first 8 bytes of SHA-256(publicKey). */
export async function keyIdOf(publicKey) {
  const digest = await crypto.subtle.digest("SHA-256", publicKey);
  return new Uint8Array(digest).slice(0, KEY_ID_LEN);
}

export function base64urlEncode(data) {
  let binary = "";
  for (const byte of data) {
    binary += String.fromCharCode(byte);
  }
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function base64urlDecode(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
    throw new SealerError("base64url", "format");
  }
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

// The key checked and imported once per sealer.
async function prepare({ publicKey, keyId, tenant, kem }) {
  const pk = bytes(publicKey, "publicKey", PUBLIC_KEY_LEN);
  const id = bytes(keyId, "keyId", KEY_ID_LEN);
  if (typeof tenant !== "string" || tenant.length === 0) {
    throw new SealerError("tenant", "required");
  }
  // The key id is derived from the key: a mismatch means the page mixed up two keys,
  // and the vault would refuse every card sealed with it.
  const expected = await keyIdOf(pk);
  if (!expected.every((b, i) => b === id[i])) {
    throw new SealerError("keyId", "mismatch");
  }
  const suite = createSuite(kem);
  const recipientPublicKey = await suite.kem.importKey("raw", pk.slice().buffer, true);
  return { suite, recipientPublicKey, keyId: id, info: info(tenant, id) };
}

async function sealWith(prepared, card, issuedAtUnixMs, nonce, ikmE) {
  if (!Number.isSafeInteger(issuedAtUnixMs) || issuedAtUnixMs < 0) {
    throw new SealerError("issuedAt", "range");
  }
  const plaintext = new TextEncoder().encode(cardJson(card));
  try {
    if (plaintext.length > MAX_PLAINTEXT_LEN) {
      throw new SealerError("card", "too_long");
    }
    const header = new Uint8Array(HEADER_LEN);
    header[0] = FORMAT_V1;
    header.set(prepared.keyId, 1);
    new DataView(header.buffer).setBigUint64(9, BigInt(issuedAtUnixMs), false);
    header.set(nonce, 17);
    const params = { recipientPublicKey: prepared.recipientPublicKey, info: prepared.info };
    if (ikmE !== undefined) {
      params.ekm = bytes(ikmE, "ikmE", 32).slice().buffer;
    }
    const { ct, enc } = await prepared.suite.seal(params, plaintext, header);
    const out = new Uint8Array(HEADER_LEN + enc.byteLength + ct.byteLength);
    out.set(header, 0);
    out.set(new Uint8Array(enc), HEADER_LEN);
    out.set(new Uint8Array(ct), HEADER_LEN + enc.byteLength);
    return out;
  } finally {
    // Best effort: JavaScript cannot erase the strings the card came from, but the
    // bytes we made need not linger until the collector gets to them.
    plaintext.fill(0);
  }
}

function integerField(value, field, min, max) {
  const n = typeof value === "string" && /^[0-9]{1,4}$/.test(value) ? Number(value) : value;
  if (!Number.isInteger(n)) {
    throw new SealerError(field, "required");
  }
  if (n < min || n > max) {
    throw new SealerError(field, "range");
  }
  return n;
}

function bytes(value, field, length) {
  let out = value;
  if (typeof value === "string") {
    try {
      out = base64urlDecode(value);
    } catch {
      throw new SealerError(field, "base64url");
    }
  }
  if (!(out instanceof Uint8Array) || out.length !== length) {
    throw new SealerError(field, "length");
  }
  return out;
}
