// An independent age implementation (typage, npm age-encryption) for the interop tests.
//   node age-interop.mjs decrypt IDENTITY_FILE < age-file > plaintext
//   node age-interop.mjs encrypt RECIPIENT < plaintext > age-file
//   node age-interop.mjs keygen            (prints a hybrid identity, then its recipient)
import { readFileSync } from "node:fs";
import { webcrypto } from "node:crypto";

// Node 18 (Debian bookworm's, which CI installs) has no global Web Crypto in ES modules; the
// noble libraries under typage read globalThis.crypto when they load, so set it first and
// load typage after.
if (!globalThis.crypto?.getRandomValues) globalThis.crypto = webcrypto;
const age = await import("age-encryption");

const [mode, arg] = process.argv.slice(2);
if (mode === "decrypt") {
  const d = new age.Decrypter();
  for (const line of readFileSync(arg, "utf8").split("\n")) {
    if (line.trim() && !line.startsWith("#")) d.addIdentity(line.trim());
  }
  process.stdout.write(await d.decrypt(new Uint8Array(readFileSync(0))));
} else if (mode === "encrypt") {
  const e = new age.Encrypter();
  e.addRecipient(arg);
  process.stdout.write(await e.encrypt(new Uint8Array(readFileSync(0))));
} else if (mode === "keygen") {
  const id = await age.generateHybridIdentity();
  process.stdout.write(id + "\n" + (await age.identityToRecipient(id)) + "\n");
} else {
  process.stderr.write("usage: age-interop.mjs decrypt FILE | encrypt RECIPIENT | keygen\n");
  process.exit(2);
}
