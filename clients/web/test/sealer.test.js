// The test vector of docs/sealed-intake.md, byte for byte, and the sealer's own checks.
// Run with `npm test` (node --test).

import assert from "node:assert/strict";
import { webcrypto } from "node:crypto";
import { test } from "node:test";

import { CipherSuite, Aes256Gcm, DhkemX25519HkdfSha256, HkdfSha256 } from "@hpke/core";

import {
  HEADER_LEN,
  SealerError,
  base64urlDecode,
  base64urlEncode,
  cardJson,
  createSealer,
  info,
  keyIdOf,
  sealDeterministicForTests,
} from "../sealer.js";

// Node 18 (Debian 12's) has WebCrypto, X25519 included, but not as a global yet.
globalThis.crypto ??= webcrypto;

const hex = (text) => Uint8Array.from(text.replace(/\s+/g, "").match(/../g), (h) => parseInt(h, 16));
const toHex = (data) => Array.from(data, (b) => b.toString(16).padStart(2, "0")).join("");

// docs/sealed-intake.md, "Test vectors".
const VECTOR = {
  ikmR: hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"),
  publicKey: hex("b1f1b840de7a3241b02748cf9b05b74dc8c5e8451298738817bd76aa8ebe8c2b"),
  keyId: hex("01520b9fd72dc69a"),
  tenant: "demo-shop",
  info: "746f6b656e7661756c742f7365616c65642d636172642f76310001520b9fd72dc69a64656d6f2d73686f70",
  ikmE: hex("a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"),
  nonce: hex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"),
  issuedAt: 1800000000000,
  plaintext:
    '{"number":"4242424242424242","exp_month":12,"exp_year":2030,"cvc":"123","name":"Ada Lovelace"}',
  card: { number: "4242424242424242", exp_month: 12, exp_year: 2030, cvc: "123", name: "Ada Lovelace" },
  sealed: `
    0101520b9fd72dc69a000001a3185c5000f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff
    1045e1e902b78d7f74c668716b022bd513378d552a526d6533ef16e286749c3dcdc345cf
    a3aa4c54edb1f7bbd5b67dc82e4f0a4bdcda7a7d830fe5a4f514c37ba72145e211a3eefb
    c6db4cc236ea3c5930ca425245af7498acd8be2ce59192930f7f1e0c7f84bb3fa84f6f00
    750330b4b570ccce64354abcc5675775354ce7fd39bbb8804456a60e4332feb5b14f`,
};

const suite = () =>
  new CipherSuite({ kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes256Gcm() });

// Opens a sealed card as the vault would (recipient key from ikmR), for round trips.
async function open(sealed, tenant = VECTOR.tenant) {
  const s = suite();
  const recipient = await s.kem.deriveKeyPair(VECTOR.ikmR.slice().buffer);
  const plaintext = await s.open(
    {
      recipientKey: recipient,
      enc: sealed.slice(HEADER_LEN, HEADER_LEN + 32).buffer,
      info: info(tenant, sealed.slice(1, 9)),
    },
    sealed.slice(HEADER_LEN + 32).buffer,
    sealed.slice(0, HEADER_LEN).buffer,
  );
  return new TextDecoder().decode(plaintext);
}

test("the recipient key, key id and info of the vector", async () => {
  const s = suite();
  const pair = await s.kem.deriveKeyPair(VECTOR.ikmR.slice().buffer);
  const pk = new Uint8Array(await s.kem.serializePublicKey(pair.publicKey));
  assert.equal(toHex(pk), toHex(VECTOR.publicKey));
  assert.equal(toHex(await keyIdOf(pk)), toHex(VECTOR.keyId));
  assert.equal(toHex(info(VECTOR.tenant, VECTOR.keyId)), VECTOR.info);
  assert.equal(cardJson(VECTOR.card), VECTOR.plaintext);
});

test("reproduces the sealed card of the vector byte for byte", async () => {
  const sealed = await sealDeterministicForTests({
    publicKey: VECTOR.publicKey,
    keyId: VECTOR.keyId,
    tenant: VECTOR.tenant,
    card: VECTOR.card,
    issuedAtUnixMs: VECTOR.issuedAt,
    nonce: VECTOR.nonce,
    ikmE: VECTOR.ikmE,
  });
  assert.equal(sealed.length, 175);
  assert.equal(toHex(sealed), toHex(hex(VECTOR.sealed)));
  assert.equal(await open(sealed), VECTOR.plaintext);
});

test("a sealer stamps the server's time plus elapsed, a fresh nonce and ephemeral key", async () => {
  const serverTime = 1_700_000_000_000;
  const sealer = await createSealer({
    publicKey: base64urlEncode(VECTOR.publicKey),
    keyId: base64urlEncode(VECTOR.keyId),
    tenant: VECTOR.tenant,
    serverTimeUnixMs: serverTime,
  });
  await new Promise((resolve) => setTimeout(resolve, 30));
  const card = { number: "4242 4242-4242 4242", exp_month: "7", exp_year: 2031 };
  const a = base64urlDecode(await sealer.seal(card));
  const b = base64urlDecode(await sealer.seal(card));
  const view = new DataView(a.buffer);
  assert.equal(a[0], 1);
  assert.equal(toHex(a.slice(1, 9)), toHex(VECTOR.keyId));
  const issuedAt = Number(view.getBigUint64(9, false));
  assert.ok(issuedAt >= serverTime + 25 && issuedAt < serverTime + 10_000, `${issuedAt - serverTime}`);
  // Neither the nonce nor the encapsulated key repeats.
  assert.notEqual(toHex(a.slice(17, 33)), toHex(b.slice(17, 33)));
  assert.notEqual(toHex(a.slice(33, 65)), toHex(b.slice(33, 65)));
  assert.equal(await open(a), '{"number":"4242 4242-4242 4242","exp_month":7,"exp_year":2031}');
  // Bound to the tenant.
  await assert.rejects(open(a, "other-shop"));
  // And to the header: one flipped bit of the stamp and it does not open.
  a[16] ^= 1;
  await assert.rejects(open(a));
});

test("refusals name the field and rule, never the value", async () => {
  const cases = [
    [{ number: "4242x4242424242424242", exp_month: 1, exp_year: 2030 }, "card.number", "format"],
    [{ exp_month: 1, exp_year: 2030 }, "card.number", "required"],
    [{ number: "4242424242424242", exp_month: 13, exp_year: 2030 }, "card.exp_month", "range"],
    [{ number: "4242424242424242", exp_month: 1, exp_year: 30 }, "card.exp_year", "range"],
    [{ number: "4242424242424242", exp_month: 1, exp_year: 2030, cvc: "12" }, "card.cvc", "format"],
    [{ number: "4242424242424242", exp_month: 1, exp_year: 2030, name: "x".repeat(129) }, "card.name", "too_long"],
  ];
  for (const [card, field, rule] of cases) {
    assert.throws(() => cardJson(card), (error) => {
      assert.ok(error instanceof SealerError);
      assert.equal(error.field, field);
      assert.equal(error.rule, rule);
      assert.ok(!error.message.includes("4242"), error.message);
      return true;
    });
  }
  // A key id that is not the key's.
  await assert.rejects(
    createSealer({
      publicKey: VECTOR.publicKey,
      keyId: new Uint8Array(8),
      tenant: VECTOR.tenant,
      serverTimeUnixMs: 1,
    }),
    (error) => error.field === "keyId" && error.rule === "mismatch",
  );
});

test("the pure-JavaScript X25519 (@hpke/dhkem-x25519, for older browsers) gives the same bytes", async () => {
  const { DhkemX25519HkdfSha256: PureX25519 } = await import("@hpke/dhkem-x25519");
  const sealed = await sealDeterministicForTests({
    publicKey: VECTOR.publicKey,
    keyId: VECTOR.keyId,
    tenant: VECTOR.tenant,
    kem: new PureX25519(),
    card: VECTOR.card,
    issuedAtUnixMs: VECTOR.issuedAt,
    nonce: VECTOR.nonce,
    ikmE: VECTOR.ikmE,
  });
  assert.equal(toHex(sealed), toHex(hex(VECTOR.sealed)));
  const sealer = await createSealer({
    publicKey: VECTOR.publicKey,
    keyId: VECTOR.keyId,
    tenant: VECTOR.tenant,
    serverTimeUnixMs: 1,
    kem: new PureX25519(),
  });
  const card = { number: "5555555555554444", exp_month: 1, exp_year: 2032 };
  assert.equal(await open(base64urlDecode(await sealer.seal(card))), cardJson(card));
});
