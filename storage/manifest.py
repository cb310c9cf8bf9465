"""The manifest (format version 3 for encrypted models, 2 for public ones; version 1 is still
read) and the metadata object: docs/format.md sections 5, 6 and 13.

Version 3 hides sizes: an encrypted model's plaintext is padded to its Padmé bucket
(:func:`padme`) inside the age plaintext, the sealed metadata is padded too
(:func:`pad_metadata`), and the exact size, name, creation time and parent live only in the
sealed metadata.

A manifest is immutable and named by its CID, so two things matter more than convenience:
the same manifest must always serialize to the same bytes (canonical JSON, see
:func:`canonical_json`), and a reader must refuse anything the format does not allow rather
than guess (every check raises :class:`~storage.errors.ManifestError` naming the offending
field, e.g. ``segments[2].fragments[5].cid``). The dataclasses validate themselves on
construction, so an invalid manifest cannot be built in code either.

This module is pure: no I/O, no IPFS, no cryptography. It treats the age header and the
sealed metadata as opaque bytes and checks only their outer shape; the one thing it borrows
from :mod:`storage.age` is the parser of ``age1...`` strings, to check recorded recipients.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from fusenode import strictjson
from fusenode.defaults import MAX_SEGMENT_SIZE
from fusenode.storage.age import decode_header, parse_recipient
from fusenode.storage.erasure import ALGORITHM, fragment_size, validate_parameters
from fusenode.storage.errors import InvalidArgument, ManifestError, StorageError
from fusenode.storage.multiformats import DAG_PB, IDENTITY, RAW, SHA2_256, parse_cid

__all__ = [
    "ENCRYPTION_AGE",
    "ENCRYPTION_NONE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FORMAT_VERSION_SEALED",
    "MAX_MANIFEST_SIZE",
    "METADATA_MIN_BUCKET",
    "PAYLOAD_MIN_BUCKET",
    "ErasureParams",
    "FragmentRef",
    "Manifest",
    "Metadata",
    "SegmentRef",
    "age_plaintext_size",
    "canonical_json",
    "check_header_fits",
    "format_time",
    "is_valid_cid",
    "metadata_bucket",
    "pad_metadata",
    "padded_size",
    "padme",
    "parse_time",
    "unpad_metadata",
    "utc_now",
]

FORMAT_NAME = "fusenode-manifest"
FORMAT_VERSION = 2
#: Encrypted models are written as version 3 (sizes hidden, docs/format.md 13); public ones
#: stay version 2 (nothing of theirs is secret, so padding would only cost).
FORMAT_VERSION_SEALED = 3
#: Version 1 listed a SHA-256 beside each fragment CID; version 2 drops it, the CID being the
#: fragment's content hash already (docs/format.md 11). Both are read; new manifests are 2,
#: and a version-1 manifest stays version 1 when it is re-sealed (`storage.share`), since its
#: fragments, and so their refs, do not change.
SUPPORTED_VERSIONS = (1, 2, 3)
ENCRYPTION_AGE = "age-v1"
ENCRYPTION_NONE = "none"

MAX_MANIFEST_SIZE = 64 * 1024 * 1024
MAX_AGE_HEADER_SIZE = 64 * 1024
MAX_METADATA_SIZE = 1024 * 1024
#: Version 3 sealed metadata is padded to padme(max(length, this + the length of its
#: recipient list)): everything up to 4 KiB besides the recipients (a name, a provenance
#: report) looks the same, whatever the number and kind of recipients (docs/format.md 13.4).
METADATA_MIN_BUCKET = 4096
#: Version 3 pads the age plaintext to padme(max(size, this)) (`padded_size`): below it a
#: Padmé bucket is a few bytes wide, so a small file would show its size (docs/format.md 13.1).
PAYLOAD_MIN_BUCKET = 4096
MAX_JSON_INT = 2**53 - 1
"""Larger integers are not exact in every JSON implementation (IEEE doubles)."""

_AGE_INTRO = b"age-encryption.org/v1\n"
_AGE_CHUNK = 64 * 1024
_AGE_TAG = 16
_AGE_NONCE = 16
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MEDIA_TYPE_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_CID_CODECS = {DAG_PB: "dag-pb", RAW: "raw"}


# --- encoding helpers -------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """The one byte string for a JSON value: sorted keys, no whitespace, raw UTF-8.

    This exact call is the definition in docs/format.md 5.1; changing any argument changes
    every manifest's bytes and CID.
    """
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ManifestError(f"value cannot be encoded as canonical JSON: {err}") from None


def _parse_json(data: bytes, what: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{what} is not valid UTF-8: {err}") from None
    try:
        return strictjson.loads(text)
    except ValueError as err:  # syntax, duplicate key, NaN/Infinity, nesting
        raise ManifestError(f"{what} is not valid JSON: {err}") from None


@contextlib.contextmanager
def _at(path: str) -> Iterator[None]:
    """Prefix errors raised inside with the field path, so messages point at the culprit."""
    try:
        yield
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from None


def _check_keys(
    obj: Any, what: str, required: set[str], optional: frozenset[str] = frozenset()
) -> None:
    """Exact key set: the format has no extension point (docs/format.md 11)."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{what} must be a JSON object, got {_json_type(obj)}")
    missing = sorted(required - obj.keys())
    if missing:
        raise ManifestError(f"{what} lacks required key(s): {', '.join(missing)}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise ManifestError(f"{what} has unknown key(s) for this version: {', '.join(unknown)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _int(value: Any, name: str, low: int = 0, high: int = MAX_JSON_INT) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"{name} must be an integer, got {_json_type(value)}")
    if not low <= value <= high:
        raise ManifestError(f"{name} {value} is out of range {low}..{high}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{name} must be a string, got {_json_type(value)}")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ManifestError(f"{name} must be an array, got {_json_type(value)}")
    return value


def _sha256(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ManifestError(f"{name} must be 64 lowercase hex digits, got {value!r:.80}")
    return value


def _b64decode(value: Any, name: str) -> bytes:
    """Strict base64: standard alphabet, padding, nothing that decodes two ways."""
    text = _str(value, name)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ManifestError(f"{name} is not valid base64: {err}") from None
    if base64.b64encode(data).decode("ascii") != text:
        raise ManifestError(f"{name} is not canonical base64 (padding or trailing bits)")
    return data


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def utc_now() -> datetime:
    """The current time as the format stores it: UTC, whole seconds."""
    return datetime.now(UTC).replace(microsecond=0)


def format_time(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ``; refuses what that form cannot hold exactly."""
    _check_time(moment, "time")
    return moment.strftime(_TIME_FORMAT)


def parse_time(text: Any, name: str = "time") -> datetime:
    """Parse the one allowed spelling of a time (no offsets, no fractions, no lowercase)."""
    if not isinstance(text, str) or not _TIME_RE.fullmatch(text):
        raise ManifestError(f"{name} must look like 2025-01-31T12:00:00Z, got {text!r:.80}")
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as err:
        raise ManifestError(f"{name} {text!r} is not a valid date and time: {err}") from None


def _check_time(moment: Any, name: str) -> None:
    if not isinstance(moment, datetime):
        raise ManifestError(f"{name} must be a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() != UTC.utcoffset(None):
        raise ManifestError(f"{name} must be in UTC (tzinfo=UTC), got {moment!r}")
    if moment.microsecond:
        raise ManifestError(f"{name} must be whole seconds (use .replace(microsecond=0))")


# --- CIDs -------------------------------------------------------------------------------


def is_valid_cid(text: Any) -> bool:
    """True for a CIDv0 (``Qm...``, 46 characters) or a lowercase base32 CIDv1 (``b...``).

    Syntax only (multibase, version, codec dag-pb or raw, multihash length): whether IPFS
    has the content is not checked.
    """
    if not isinstance(text, str):
        return False
    try:
        cid = parse_cid(text, minimal=True)
    except ValueError:
        return False
    # hash code 0 is "identity": the data would sit in the CID itself, never a fragment.
    return cid.version == 0 or (
        cid.codec in _CID_CODECS
        and cid.multihash.code != IDENTITY
        and 16 <= len(cid.multihash.digest) <= 64
    )


def _cid(value: Any, name: str) -> str:
    if not is_valid_cid(value):
        raise ManifestError(
            f"{name} {value!r:.80} is not a valid CID (CIDv0 'Qm...' of 46 base58 "
            "characters, or lowercase base32 CIDv1 'b...')"
        )
    return value


# --- age shape --------------------------------------------------------------------------


def age_plaintext_size(payload_size: int) -> int | None:
    """The plaintext size an age payload of ``payload_size`` bytes holds, or None if none.

    age cuts the plaintext into 64 KiB chunks, each + 16-byte tag, after a 16-byte nonce; the
    last chunk is never empty unless the whole plaintext is. So the size is exact (which is
    also why the payload size leaks the plaintext size, docs/format.md 12).
    """
    body = payload_size - _AGE_NONCE
    if body < _AGE_TAG:
        return None
    full, rest = divmod(body, _AGE_CHUNK + _AGE_TAG)
    if rest == 0:
        return full * _AGE_CHUNK if full else None
    if rest == _AGE_TAG:
        return 0 if full == 0 else None  # an empty final chunk only for empty plaintext
    if rest < _AGE_TAG:
        return None
    return full * _AGE_CHUNK + rest - _AGE_TAG


def padme(length: int) -> int:
    """Padmé (Nikitin et al., "Reducing Metadata Leakage from Encrypted Files and
    Communication with PURBs", PETS 2019): ``length`` rounded up so that only the top
    ``floor(log2(E)) + 1`` bits of its ``E = floor(log2(length))``-bit value may be non-zero.
    Overhead at most ~12% (less as sizes grow); a padded size leaks O(log log length) bits."""
    if not isinstance(length, int) or length < 0:
        raise InvalidArgument(f"padme: a length is an integer >= 0, got {length!r:.40}")
    if length < 2:
        return length
    exponent = length.bit_length() - 1  # floor(log2(length))
    low_bits = exponent - exponent.bit_length()  # E - (floor(log2(E)) + 1)
    if low_bits <= 0:
        return length
    mask = (1 << low_bits) - 1
    return (length + mask) & ~mask


def padded_size(size: int) -> int:
    """The padded age plaintext size of a version 3 payload of ``size`` real bytes: its
    Padmé bucket, and never under :data:`PAYLOAD_MIN_BUCKET` (docs/format.md 13.1)."""
    return padme(max(size, PAYLOAD_MIN_BUCKET))


def recipients_allowance(recipients: Any) -> int:
    """How many bytes the ``recipients`` list adds to version 3's minimum metadata bucket:
    the length of its canonical JSON (0 without one). Recipient strings have one length per
    type and the header shows every stanza's type, so this is public information, and two
    models to the same kinds of keys get the same minimum whatever else they record."""
    if not isinstance(recipients, list) or not recipients:
        return 0
    return len(canonical_json(recipients))


def metadata_bucket(json_length: int, allowance: int = 0) -> int:
    """The padded plaintext length of version 3 sealed metadata whose JSON is this long and
    whose recipient list takes ``allowance`` bytes (`recipients_allowance`)."""
    return padme(max(json_length, METADATA_MIN_BUCKET + allowance))


def pad_metadata(json_bytes: bytes) -> bytes:
    """Version 3 sealed metadata plaintext: the canonical JSON, then ASCII spaces (JSON
    whitespace, so ``age -d`` still gives valid JSON) up to :func:`metadata_bucket`."""
    obj = _parse_json(json_bytes, "metadata")
    allowance = recipients_allowance(obj.get("recipients") if isinstance(obj, dict) else None)
    return json_bytes + b" " * (metadata_bucket(len(json_bytes), allowance) - len(json_bytes))


def unpad_metadata(plaintext: bytes) -> bytes:
    """The JSON of version 3 sealed metadata; ManifestError if it is not exactly what
    :func:`pad_metadata` writes: canonical JSON from the first byte (no whitespace before
    it or inside it), then spaces only, up to its bucket. Anything else would be a second
    spelling of one metadata object, and a side channel."""
    body = plaintext.rstrip(b" ")
    try:
        obj = _parse_json(body, "sealed metadata") if body.startswith(b"{") else None
        canonical = isinstance(obj, dict) and canonical_json(obj) == body
    except ManifestError:
        canonical = False
    if not canonical:
        raise ManifestError(
            "sealed metadata padding is wrong: not canonical JSON followed by spaces only "
            "(whitespace before or inside the JSON, other padding bytes, or another spelling)"
        )
    bucket = metadata_bucket(len(body), recipients_allowance(obj.get("recipients")))
    if len(plaintext) != bucket:
        raise ManifestError(
            f"sealed metadata padding is wrong: {len(plaintext)} bytes for {len(body)} bytes "
            f"of JSON (expected {bucket}, spaces only)"
        )
    return body


def check_header_fits(header: bytes) -> None:
    """InvalidArgument, naming how many recipients fit, when a header a writer has just
    built is over :data:`MAX_AGE_HEADER_SIZE`: called before any data is encoded or placed
    (a manifest would refuse it only at the end)."""
    if len(header) <= MAX_AGE_HEADER_SIZE:
        return
    parsed = decode_header(header).stanzas
    stanzas = [s.encode() for s in parsed]
    largest = max(len(s) for s in stanzas)
    fit = (MAX_AGE_HEADER_SIZE - (len(header) - sum(len(s) for s in stanzas))) // largest
    kind = "post-quantum " if any(s.type == "mlkem768x25519" for s in parsed) else ""
    raise InvalidArgument(
        f"{len(stanzas)} {kind}recipients make a {len(header)}-byte age header, over the "
        f"{MAX_AGE_HEADER_SIZE}-byte limit of a manifest: at most {fit} {kind}recipients fit "
        "(store the model again for the others)"
    )


def _check_age_header(header: Any) -> None:
    if not isinstance(header, bytes):
        raise ManifestError(f"age_header must be bytes, got {type(header).__name__}")
    if not 1 <= len(header) <= MAX_AGE_HEADER_SIZE:
        raise ManifestError(f"age_header is {len(header)} bytes, allowed 1..{MAX_AGE_HEADER_SIZE}")
    if not header.startswith(_AGE_INTRO):
        raise ManifestError("age_header does not start with 'age-encryption.org/v1'")
    last_line = header[:-1].rsplit(b"\n", 1)[-1]
    if not header.endswith(b"\n") or not last_line.startswith(b"--- "):
        raise ManifestError("age_header does not end with the '--- MAC' line and a newline")


def _check_sealed_metadata(sealed: bytes) -> None:
    if not 1 <= len(sealed) <= MAX_METADATA_SIZE + _AGE_NONCE + 17 * _AGE_TAG:
        raise ManifestError(f"sealed metadata is {len(sealed)} bytes, too large or empty")
    if age_plaintext_size(len(sealed)) is None:
        raise ManifestError(f"sealed metadata is {len(sealed)} bytes, not an age payload length")


# --- metadata ---------------------------------------------------------------------------


def _check_name(name: Any) -> None:
    """A plain file name: the reader writes a file under it, so no path may sneak in."""
    _str(name, "name")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError("name is not valid Unicode (lone surrogate)") from None
    if not 1 <= len(encoded) <= 255:
        raise ManifestError(f"name is {len(encoded)} UTF-8 bytes, allowed 1..255")
    if name in {".", ".."} or any(c in "/\\" for c in name):
        raise ManifestError(f"name {name!r} is a path, not a file name")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ManifestError(f"name {name!r} contains control characters")


def _check_json_value(value: Any, path: str) -> None:
    """Only what JSON holds as is: json.dumps would silently turn a key 1 into "1"."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ManifestError(f"{path} has a non-string key {key!r:.40}")
            _check_json_value(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json_value(item, f"{path}[{i}]")
    elif value is not None and not isinstance(value, str | int | float):
        raise ManifestError(f"{path} holds a {type(value).__name__}, not a JSON value")


def _check_provenance(provenance: Any) -> dict[str, Any]:
    """Any JSON object; copied through JSON so that later mutation cannot reach it."""
    if not isinstance(provenance, Mapping):
        raise ManifestError(f"provenance must be an object, got {_json_type(provenance)}")
    _check_json_value(provenance, "provenance")
    try:
        encoded = canonical_json(dict(provenance))
    except ManifestError as err:
        raise ManifestError(f"provenance: {err}") from None
    return json.loads(encoded)


def _check_attestation(envelope: Any) -> dict[str, Any]:
    """A DSSE envelope's outer shape: ``payloadType`` and ``payload`` strings and a non-empty
    ``signatures`` array of objects. Its signature and statement are checked by whoever
    verifies it (`fusenode.node.provenance`), not by every reader of the metadata."""
    if not isinstance(envelope, Mapping):
        raise ManifestError(f"attestation must be an object, got {_json_type(envelope)}")
    _check_keys(dict(envelope), "attestation", {"payloadType", "payload", "signatures"})
    _str(envelope["payloadType"], "attestation.payloadType")
    _str(envelope["payload"], "attestation.payload")
    signatures = _list(envelope["signatures"], "attestation.signatures")
    if not signatures or not all(isinstance(s, Mapping) for s in signatures):
        raise ManifestError("attestation.signatures must be a non-empty array of objects")
    _check_json_value(envelope, "attestation")
    return json.loads(canonical_json(dict(envelope)))


def _check_recipients(recipients: Any) -> tuple[str, ...]:
    """Distinct ``age1...`` strings in their one canonical spelling, at least one.

    Canonical and distinct because the list is compared and extended (a share appends, a
    republish copies it): two spellings of one key would count it twice. Empty is refused
    so that "none recorded" has one spelling, the omitted member.
    """
    if isinstance(recipients, str | bytes) or not isinstance(recipients, Sequence):
        raise ManifestError(f"recipients must be an array of strings, got {_json_type(recipients)}")
    if not recipients:
        raise ManifestError("recipients must not be empty (omit the member instead)")
    seen: set[str] = set()
    for i, text in enumerate(recipients):
        _str(text, f"recipients[{i}]")
        try:
            canonical = parse_recipient(text).to_string()
        except StorageError:
            canonical = None
        if canonical != text:
            raise ManifestError(
                f"recipients[{i}] {text!r:.80} is not an age recipient in canonical form "
                "(lowercase age1... or age1pq1...)"
            )
        if text in seen:
            raise ManifestError(f"recipients[{i}] {text!r:.80} is listed twice")
        seen.add(text)
    return tuple(recipients)


def _check_extra(extra: Any, known: frozenset[str]) -> dict[str, Any]:
    """Extension members: a JSON object whose keys are not this version's own members."""
    if not isinstance(extra, Mapping):
        raise ManifestError(f"extra metadata must be an object, got {_json_type(extra)}")
    clash = sorted(set(extra) & known)
    if clash:
        raise ManifestError(f"extra metadata redefines member(s): {', '.join(clash)}")
    _check_json_value(extra, "metadata")
    return json.loads(canonical_json(dict(extra)))


@dataclass(frozen=True)
class Metadata:
    """What the plaintext is; sealed with age in encrypted mode, in clear in public mode."""

    name: str
    size: int
    sha256: str
    created: datetime
    media_type: str | None = None
    provenance: Mapping[str, Any] | None = None
    #: The X25519 recipients (``age1...``) the file key is wrapped to, when the writer
    #: recorded them: the header cannot tell (docs/format.md 6). Encrypted mode only.
    recipients: tuple[str, ...] | None = None
    #: The signed provenance: a DSSE envelope (docs/format.md 15), checked by
    #: `fusenode.node.provenance`; here only its outer shape.
    attestation: Mapping[str, Any] | None = None
    #: Manifest CID of the model this one was derived from. Version 3 keeps it here, sealed,
    #: instead of in the manifest (docs/format.md 13).
    parent: str | None = None
    #: Members this version does not define, kept as they are (version 3 sealed metadata
    #: only: it is the extension point for fields such as signed provenance; readers that do
    #: not know a member ignore it, and a share or republish carries it over).
    extra: Mapping[str, Any] | None = None

    _REQUIRED: ClassVar[set[str]] = {"name", "size", "sha256", "created"}
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"media_type", "provenance", "recipients", "parent", "attestation"}
    )

    def __post_init__(self) -> None:
        _check_name(self.name)
        _int(self.size, "size")
        _sha256(self.sha256, "sha256")
        _check_time(self.created, "created")
        if self.media_type is not None and not (
            isinstance(self.media_type, str) and _MEDIA_TYPE_RE.fullmatch(self.media_type)
        ):
            raise ManifestError(f"media_type {self.media_type!r:.80} is not 'type/subtype'")
        if self.provenance is not None:
            object.__setattr__(self, "provenance", _check_provenance(self.provenance))
        if self.recipients is not None:
            object.__setattr__(self, "recipients", _check_recipients(self.recipients))
        if self.attestation is not None:
            object.__setattr__(self, "attestation", _check_attestation(self.attestation))
        if self.parent is not None:
            _cid(self.parent, "parent")
        if self.extra is not None:
            object.__setattr__(self, "extra", _check_extra(self.extra, self._known()))
        if len(canonical_json(self.to_obj())) > MAX_METADATA_SIZE:
            raise ManifestError(f"metadata is larger than {MAX_METADATA_SIZE} bytes")

    @staticmethod
    def recipient_strings(recipients: Iterable[object]) -> tuple[str, ...] | None:
        """What ``recipients`` records for a file encrypted to ``recipients``, or None.

        Only public-key recipients (X25519, mlkem768x25519) are listed (a passphrase is
        nobody's key, and age allows it only alone, so a passphrase file records None);
        duplicates are dropped, order kept.
        """
        listed = (r.to_string() for r in recipients if hasattr(r, "to_string"))
        return tuple(dict.fromkeys(listed)) or None

    @classmethod
    def _known(cls) -> frozenset[str]:
        return frozenset(cls._REQUIRED) | cls._OPTIONAL

    def to_obj(self) -> dict[str, Any]:
        """The JSON object (optional members omitted, never null)."""
        obj: dict[str, Any] = {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "created": format_time(self.created),
        }
        if self.media_type is not None:
            obj["media_type"] = self.media_type
        if self.provenance is not None:
            obj["provenance"] = self.provenance
        if self.recipients is not None:
            obj["recipients"] = list(self.recipients)
        if self.attestation is not None:
            obj["attestation"] = self.attestation
        if self.parent is not None:
            obj["parent"] = self.parent
        if self.extra:
            obj.update(self.extra)
        return obj

    def to_json(self) -> bytes:
        """Canonical JSON bytes: what gets sealed with age."""
        return canonical_json(self.to_obj())

    @classmethod
    def from_obj(cls, obj: Any, *, extensible: bool = False) -> Metadata:
        """``extensible``: keep members this version does not define in ``extra`` (version 3
        sealed metadata) instead of refusing them."""
        if extensible and isinstance(obj, dict):
            extra = {k: v for k, v in obj.items() if k not in cls._known()}
            obj = {k: v for k, v in obj.items() if k in cls._known()}
        else:
            extra = {}
        _check_keys(obj, "metadata", cls._REQUIRED, cls._OPTIONAL)
        return cls(
            name=obj["name"],
            size=obj["size"],
            sha256=obj["sha256"],
            created=parse_time(obj["created"], "created"),
            media_type=_str(obj["media_type"], "media_type") if "media_type" in obj else None,
            provenance=obj.get("provenance"),
            recipients=_list(obj["recipients"], "recipients") if "recipients" in obj else None,
            attestation=obj.get("attestation"),
            parent=_cid(obj["parent"], "parent") if "parent" in obj else None,
            extra=extra or None,
        )

    @classmethod
    def from_json(cls, data: bytes, *, extensible: bool = False) -> Metadata:
        """Parse decrypted (or public) metadata, refusing anything format.md 6 forbids."""
        if len(data) > MAX_METADATA_SIZE:
            raise ManifestError(f"metadata is larger than {MAX_METADATA_SIZE} bytes")
        obj = _parse_json(data, "metadata")
        with _at("metadata"):
            return cls.from_obj(obj, extensible=extensible)


# --- manifest ---------------------------------------------------------------------------


def _unsupported_encryption(value: Any) -> ManifestError:
    return ManifestError(
        f"encryption {value!r:.80} is not supported (versions 1 to 3 know "
        f"{ENCRYPTION_AGE!r} and {ENCRYPTION_NONE!r})"
    )


@dataclass(frozen=True)
class FragmentRef:
    """Where fragment ``index`` of a segment lives and how to recognize it: its CID, which
    is its content hash (`storage.unixfs`). ``sha256`` is the extra hash of format version 1
    (required there, absent from version 2; the manifest checks which)."""

    index: int
    cid: str
    size: int
    sha256: str | None = None

    def __post_init__(self) -> None:
        _int(self.index, "index", 0, 63)
        _cid(self.cid, "cid")
        _int(self.size, "size", 1)
        if self.sha256 is not None:
            _sha256(self.sha256, "sha256")

    @property
    def checkable(self) -> bool:
        """Whether a reader can recompute the CID from the bytes (sha2-256, dag-pb or raw)."""
        parsed = parse_cid(self.cid)
        return parsed.multihash.code == SHA2_256 and len(parsed.multihash.digest) == 32

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"index": self.index, "cid": self.cid, "size": self.size}
        if self.sha256 is not None:
            obj["sha256"] = self.sha256
        return obj

    @classmethod
    def from_obj(cls, obj: Any) -> FragmentRef:
        _check_keys(obj, "fragment", {"index", "cid", "size"}, frozenset({"sha256"}))
        return cls(index=obj["index"], cid=obj["cid"], size=obj["size"], sha256=obj.get("sha256"))


@dataclass(frozen=True)
class SegmentRef:
    """One segment of the payload: its size and its n fragments, in index order."""

    index: int
    size: int
    fragments: tuple[FragmentRef, ...]

    def __post_init__(self) -> None:
        _int(self.index, "index")
        _int(self.size, "size", 1, MAX_SEGMENT_SIZE)
        if not isinstance(self.fragments, Sequence) or isinstance(self.fragments, str):
            raise ManifestError("fragments must be a sequence of FragmentRef")
        object.__setattr__(self, "fragments", tuple(self.fragments))
        for position, fragment in enumerate(self.fragments):
            if not isinstance(fragment, FragmentRef):
                raise ManifestError(f"fragments[{position}] must be a FragmentRef")
            if fragment.index != position:
                raise ManifestError(
                    f"fragments[{position}] has index {fragment.index}; fragments must be "
                    "listed in index order 0..n-1"
                )

    def to_obj(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "size": self.size,
            "fragments": [f.to_obj() for f in self.fragments],
        }

    @classmethod
    def from_obj(cls, obj: Any) -> SegmentRef:
        _check_keys(obj, "segment", {"index", "size", "fragments"})
        fragments = []
        for position, item in enumerate(_list(obj["fragments"], "fragments")):
            with _at(f"fragments[{position}]"):
                fragments.append(FragmentRef.from_obj(item))
        return cls(index=obj["index"], size=obj["size"], fragments=tuple(fragments))


@dataclass(frozen=True)
class ErasureParams:
    """How every segment was coded; the algorithm name also fixes the fragment layout."""

    k: int
    n: int
    segment_size: int
    algorithm: str = ALGORITHM

    def __post_init__(self) -> None:
        if self.algorithm != ALGORITHM:
            raise ManifestError(
                f"algorithm {self.algorithm!r:.80} is not supported (versions 1 to 3 know {ALGORITHM!r})"
            )
        _int(self.k, "k", 1, 64)
        _int(self.n, "n", 2, 64)
        try:
            validate_parameters(self.k, self.n)
        except InvalidArgument as err:
            raise ManifestError(str(err)) from None
        _int(self.segment_size, "segment_size", 1, MAX_SEGMENT_SIZE)

    def to_obj(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "k": self.k,
            "n": self.n,
            "segment_size": self.segment_size,
        }

    @classmethod
    def from_obj(cls, obj: Any) -> ErasureParams:
        _check_keys(obj, "erasure", {"algorithm", "k", "n", "segment_size"})
        return cls(
            algorithm=_str(obj["algorithm"], "algorithm"),
            k=obj["k"],
            n=obj["n"],
            segment_size=obj["segment_size"],
        )


@dataclass(frozen=True)
class Manifest:
    """A stored model: how to fetch, check, decode and decrypt it (format.md section 5).

    ``metadata`` is the sealed metadata (bytes, an age payload) when ``encryption`` is
    ``"age-v1"``, and a :class:`Metadata` in public mode (``"none"``).

    Version 3 (encrypted only) has no ``created`` and no ``parent``: both are sealed in the
    metadata, and ``payload_size`` is that of the Padmé-padded plaintext (format.md 13).
    """

    FORMAT: ClassVar[str] = FORMAT_NAME

    created: datetime | None
    encryption: str
    erasure: ErasureParams
    payload_size: int
    segments: tuple[SegmentRef, ...]
    metadata: bytes | Metadata
    age_header: bytes | None = None
    parent: str | None = None
    version: int = FORMAT_VERSION

    _REQUIRED: ClassVar[set[str]] = {
        "format",
        "version",
        "created",
        "encryption",
        "metadata",
        "erasure",
        "payload_size",
        "segments",
    }

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise ManifestError(f"version {self.version!r:.20} is not supported")
        if self.version >= FORMAT_VERSION_SEALED:
            if self.encryption != ENCRYPTION_AGE:
                raise ManifestError(
                    f"version {self.version} is for encrypted models; public ones are version "
                    f"{FORMAT_VERSION}"
                )
            if self.created is not None or self.parent is not None:
                raise ManifestError(
                    f"version {self.version} keeps created and parent in the sealed metadata"
                )
        else:
            _check_time(self.created, "created")
        if not isinstance(self.erasure, ErasureParams):
            raise ManifestError("erasure must be an ErasureParams")
        _int(self.payload_size, "payload_size", 1)
        if self.parent is not None:
            _cid(self.parent, "parent")
        self._check_encryption()
        if not isinstance(self.segments, Sequence) or isinstance(self.segments, str):
            raise ManifestError("segments must be a sequence of SegmentRef")
        object.__setattr__(self, "segments", tuple(self.segments))
        self._check_segments()

    def _check_encryption(self) -> None:
        if self.encryption == ENCRYPTION_AGE:
            if self.age_header is None:
                raise ManifestError("age_header is required when encryption is 'age-v1'")
            _check_age_header(self.age_header)
            if not isinstance(self.metadata, bytes):
                raise ManifestError("metadata must be sealed (base64 bytes) with 'age-v1'")
            with _at("metadata"):
                _check_sealed_metadata(self.metadata)
            plain = age_plaintext_size(self.payload_size)
            if plain is None:
                raise ManifestError(
                    f"payload_size {self.payload_size} is not a possible age payload length"
                )
            if self.version >= FORMAT_VERSION_SEALED and padded_size(plain) != plain:
                raise ManifestError(
                    f"payload_size {self.payload_size} holds {plain} plaintext bytes, which is "
                    f"not a padded size (version {self.version} pads to "
                    f"padme(max(size, {PAYLOAD_MIN_BUCKET})))"
                )
        elif self.encryption == ENCRYPTION_NONE:
            if self.age_header is not None:
                raise ManifestError("age_header must be absent when encryption is 'none'")
            if not isinstance(self.metadata, Metadata):
                raise ManifestError("metadata must be a clear object when encryption is 'none'")
            if self.metadata.recipients is not None:
                # A public model has no recipients; a list here would only leak keys.
                raise ManifestError("metadata.recipients must be absent when encryption is 'none'")
            if self.metadata.parent is not None or self.metadata.extra:
                raise ManifestError(
                    "a public manifest's metadata has no parent or extension members (the "
                    "parent is the manifest's own member)"
                )
            if self.metadata.size != self.payload_size:
                raise ManifestError(
                    f"metadata.size {self.metadata.size} differs from payload_size "
                    f"{self.payload_size} (public payload = plaintext)"
                )
        else:
            raise _unsupported_encryption(self.encryption)

    def _check_segments(self) -> None:
        size, count = (
            self.erasure.segment_size,
            math.ceil(self.payload_size / self.erasure.segment_size),
        )
        if len(self.segments) != count:
            raise ManifestError(
                f"segments: {len(self.segments)} listed, but payload_size {self.payload_size} "
                f"at segment_size {size} needs {count}"
            )
        seen: dict[str, str] = {}
        for i, segment in enumerate(self.segments):
            with _at(f"segments[{i}]"):
                if not isinstance(segment, SegmentRef):
                    raise ManifestError("must be a SegmentRef")
                for j, fragment in enumerate(segment.fragments):
                    where = seen.setdefault(fragment.cid, f"segments[{i}].fragments[{j}]")
                    if where != f"segments[{i}].fragments[{j}]":
                        raise ManifestError(
                            f"fragments[{j}].cid {fragment.cid} is listed twice (also at "
                            f"{where}): a manifest names each fragment once"
                        )
                if segment.index != i:
                    raise ManifestError(f"index {segment.index} differs from its position {i}")
                expected = size if i < count - 1 else self.payload_size - (count - 1) * size
                if segment.size != expected:
                    raise ManifestError(
                        f"size {segment.size}, expected {expected} from payload_size "
                        f"{self.payload_size} and segment_size {size}"
                    )
                if len(segment.fragments) != self.erasure.n:
                    raise ManifestError(
                        f"{len(segment.fragments)} fragments listed, n is {self.erasure.n}"
                    )
                frag_size = fragment_size(self.erasure.k, segment.size)
                for j, fragment in enumerate(segment.fragments):
                    if fragment.size != frag_size:
                        raise ManifestError(
                            f"fragments[{j}].size {fragment.size}, expected {frag_size} "
                            f"(80-byte header + ceil({segment.size} / k={self.erasure.k}))"
                        )
                    self._check_fragment_hashes(fragment, f"fragments[{j}]")

    def _check_fragment_hashes(self, fragment: FragmentRef, where: str) -> None:
        if self.version == 1:
            if fragment.sha256 is None:
                raise ManifestError(f"{where} lacks required key(s): sha256")
            return
        if fragment.sha256 is not None:
            raise ManifestError(
                f"{where} has unknown key(s) for this version: sha256 (version "
                f"{self.version} checks fragments by their CID)"
            )
        if not fragment.checkable:
            raise ManifestError(
                f"{where}.cid {fragment.cid} is not a sha2-256 CID, so the fragment's bytes "
                "could not be checked against it"
            )

    @property
    def encrypted(self) -> bool:
        return self.encryption == ENCRYPTION_AGE

    @property
    def size_hidden(self) -> bool:
        """Whether the plaintext is padded (version 3): then :meth:`plaintext_size` is only its
        Padmé bucket, an upper bound; the exact size is the sealed metadata's."""
        return self.version >= FORMAT_VERSION_SEALED

    def plaintext_size(self) -> int:
        """The age plaintext size, known without a key: exact before version 3 (docs/format.md
        12 says why it leaks), the padded bucket (an upper bound) from version 3 on."""
        if not self.encrypted:
            return self.payload_size
        size = age_plaintext_size(self.payload_size)
        assert size is not None  # checked on construction
        return size

    def fragment_cids(self) -> list[str]:
        """Every fragment CID, segment by segment (what a node pins for this model)."""
        return [f.cid for s in self.segments for f in s.fragments]

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "format": self.FORMAT,
            "version": self.version,
            "encryption": self.encryption,
            "erasure": self.erasure.to_obj(),
            "payload_size": self.payload_size,
            "segments": [s.to_obj() for s in self.segments],
        }
        if self.created is not None:
            obj["created"] = format_time(self.created)
        if isinstance(self.metadata, Metadata):
            obj["metadata"] = self.metadata.to_obj()
        else:
            obj["metadata"] = _b64encode(self.metadata)
        if self.age_header is not None:
            obj["age_header"] = _b64encode(self.age_header)
        if self.parent is not None:
            obj["parent"] = self.parent
        return obj

    def to_bytes(self) -> bytes:
        """The canonical bytes, the ones to add to IPFS: same manifest, same CID."""
        return canonical_json(self.to_obj())

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and fully validate a manifest, or raise ManifestError saying what is wrong.

        ``format`` and ``version`` are checked first, so a manifest from a newer fusenode is
        reported as such instead of as a list of unknown keys.
        """
        if len(data) > MAX_MANIFEST_SIZE:
            raise ManifestError(
                f"manifest is {len(data)} bytes, larger than the {MAX_MANIFEST_SIZE} allowed"
            )
        obj = _parse_json(data, "manifest")
        if not isinstance(obj, dict):
            raise ManifestError(f"manifest must be a JSON object, got {_json_type(obj)}")
        fmt = obj.get("format")
        if fmt != FORMAT_NAME:
            raise ManifestError(f"not a fusenode manifest (format is {fmt!r:.80})")
        version = obj.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ManifestError(f"manifest version must be an integer, got {version!r:.80}")
        if version not in SUPPORTED_VERSIONS:
            known = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise ManifestError(
                f"manifest version {version} is not supported (this fusenode reads versions "
                f"{known}); a newer fusenode may read it"
            )
        with _at("manifest"):
            return cls._from_obj(obj)

    @classmethod
    def _from_obj(cls, obj: dict[str, Any]) -> Manifest:
        if obj["version"] >= FORMAT_VERSION_SEALED:
            _check_keys(obj, "manifest", cls._REQUIRED - {"created"}, frozenset({"age_header"}))
        else:
            _check_keys(obj, "manifest", cls._REQUIRED, frozenset({"age_header", "parent"}))
        encryption = _str(obj["encryption"], "encryption")
        if encryption not in (ENCRYPTION_AGE, ENCRYPTION_NONE):
            raise _unsupported_encryption(encryption)
        with _at("erasure"):
            erasure = ErasureParams.from_obj(obj["erasure"])
        segments = []
        for i, item in enumerate(_list(obj["segments"], "segments")):
            with _at(f"segments[{i}]"):
                segments.append(SegmentRef.from_obj(item))
        raw_metadata = obj["metadata"]
        metadata: bytes | Metadata
        with _at("metadata"):
            if encryption == ENCRYPTION_NONE:
                metadata = Metadata.from_obj(raw_metadata)
            else:
                metadata = _b64decode(raw_metadata, "sealed metadata")
        age_header = None
        if "age_header" in obj:
            age_header = _b64decode(obj["age_header"], "age_header")
        return cls(
            created=parse_time(obj["created"], "created") if "created" in obj else None,
            encryption=encryption,
            erasure=erasure,
            payload_size=obj["payload_size"],
            segments=tuple(segments),
            metadata=metadata,
            age_header=age_header,
            parent=_cid(obj["parent"], "parent") if "parent" in obj else None,
            version=obj["version"],
        )
