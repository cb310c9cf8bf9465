"""Sharing: let more age keys read a stored model without touching a single fragment.

Why it is cheap: the payload (the fragments) is encrypted under a file key, and only the age
header, inside the manifest, says who can open that key. A share is therefore a new manifest
with the same segments and fragments, a header with one more stanza per new key (for the same
file key), and the sealed metadata sealed again so that its ``recipients`` list names the new
keys too (docs/format.md 6 and 10). The old manifest keeps working for the old keys.

What it cannot do: take access away (whoever held the file key keeps it; store the model
again for that), add keys to a passphrase file (age allows a passphrase only alone), or add a
classic X25519 key to a model stored for post-quantum keys only (that would undo their
protection for ciphertext harvested today). A post-quantum key may be added to a classic
model: it gains access, the model stays as (classically) protected as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from fusenode.defaults import FETCH_TIMEOUT
from fusenode.storage import age
from fusenode.storage.backend import IpfsBackend
from fusenode.storage.errors import InvalidArgument
from fusenode.storage.manifest import Manifest, check_header_fits
from fusenode.storage.store import load_manifest, open_metadata, seal_metadata

__all__ = ["share", "share_cid"]


def share(
    manifest: Manifest,
    identities: Iterable[age.Identity],
    new_recipients: Sequence[age.KeyRecipient],
) -> Manifest:
    """The manifest of the same model readable by ``new_recipients`` as well.

    ``identities`` must open the file key (NoIdentityMatch otherwise). Only ``age_header`` and
    the sealed ``metadata`` change: segments, fragments, erasure, payload_size, parent and
    created are kept, so no fragment is read, written or re-pinned. The metadata is sealed
    under a fresh payload nonce (never reuse one under a file key) with ``recipients``
    extended, deduplicated, order kept.

    A recipient the metadata already lists gets no second stanza; when every new recipient is
    already listed, ``manifest`` itself is returned (sharing again is a no-op, not a new CID).
    A manifest whose metadata records no ``recipients`` (written before the field existed)
    keeps recording none: a list of only the new keys would look complete, and a republish
    "to the same recipients" would then silently drop the original readers.
    """
    if not manifest.encrypted:
        raise InvalidArgument(
            "this model is public (encryption 'none'): everyone who has its CID can already "
            "read it, so there is nothing to share"
        )
    new_recipients = list(new_recipients)
    if not new_recipients:
        raise InvalidArgument("share needs at least one new recipient")
    for recipient in new_recipients:
        if not isinstance(recipient, age.X25519Recipient | age.MLKEM768X25519Recipient):
            raise InvalidArgument(
                "a model can be shared only to age public keys (age1... or age1pq1...), not "
                f"{recipient!r:.80}"
            )
    assert manifest.age_header is not None  # an encrypted Manifest always has one
    header = age.decode_header(manifest.age_header)
    # Before unwrapping: an scrypt unwrap costs a second, and the answer would be no anyway.
    if any(stanza.type == "scrypt" for stanza in header.stanzas):
        raise InvalidArgument(
            "this model is encrypted to a passphrase, which age allows only as the sole "
            "recipient: it cannot be shared to more keys (store it again to the keys instead)"
        )
    post_quantum_only = all(stanza.type == "mlkem768x25519" for stanza in header.stanzas)
    if post_quantum_only and not all(age.is_post_quantum(r) for r in new_recipients):
        raise InvalidArgument(
            "this model is encrypted to post-quantum keys only: sharing it to a classic "
            "(age1...) key would let a future quantum computer open it; share to an age1pq1... "
            "key instead"
        )
    identities = list(identities)
    file_key, metadata = open_metadata(manifest, identities)

    recorded = metadata.recipients
    known = set(recorded or ())
    additions: dict[str, age.KeyRecipient] = {}
    for recipient in new_recipients:
        text = recipient.to_string()
        if text not in known:
            additions.setdefault(text, recipient)
    if not additions:
        return manifest

    new_header = age.rewrap_header(header, identities, additions.values())
    check_header_fits(new_header)
    extended = None if recorded is None else (*recorded, *additions)
    # A fresh random nonce (a new payload key), padded as the manifest's version pads it.
    sealed = seal_metadata(
        file_key, dataclasses.replace(metadata, recipients=extended), manifest.version
    )
    return dataclasses.replace(manifest, age_header=new_header, metadata=sealed)


def share_cid(
    cid: str,
    backend: IpfsBackend,
    identities: Iterable[age.Identity],
    new_recipients: Sequence[age.KeyRecipient],
    timeout: float = FETCH_TIMEOUT,
    *,
    manifest: Manifest | None = None,
) -> tuple[str, Manifest]:
    """Share the model named ``cid``: its new manifest CID (added to ``backend``) and manifest.

    The manifest is fetched and checked against ``cid`` first (``load_manifest``), unless the
    caller has it already checked (``manifest``). Only the
    new manifest is added; its fragments are the old ones, already stored. When the share is
    a no-op (every new recipient already listed) ``cid`` itself is returned and nothing added.
    """
    if manifest is None:
        manifest = load_manifest(cid, backend, timeout=timeout)
    shared = share(manifest, identities, new_recipients)
    if shared is manifest:
        return cid, manifest
    return backend.add_bytes(shared.to_bytes()), shared
