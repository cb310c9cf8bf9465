"""Configuration: REPO/config.toml, overridden by FUSENODE_* variables, parsed once here.

The defaults are `fusenode.defaults`'; the project's config.toml (shipped as
node/default-config.toml in the package) documents them for operators, and a test keeps the
two equal. :func:`load_config` turns a repo's file into one typed :class:`Config` and reports
every mistake with the key it concerns.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusenode import defaults
from fusenode.node.errors import ConfigError
from fusenode.storage.erasure import validate_parameters
from fusenode.storage.errors import InvalidArgument

if TYPE_CHECKING:
    from fusenode.storage.swarm import SwarmSettings

DEFAULTS_PATH = Path(__file__).with_name("default-config.toml")


@dataclass(frozen=True)
class NodeSection:
    swarm_host: str = "127.0.0.1"
    swarm_port: int = 0
    announce: tuple[str, ...] = ()


@dataclass(frozen=True)
class ApiSection:
    host: str = "127.0.0.1"
    port: int = 0
    max_body_bytes: int = defaults.API_MAX_BODY


@dataclass(frozen=True)
class StorageSection:
    k: int = defaults.K
    n: int = defaults.N
    segment_size: int = defaults.SEGMENT_SIZE
    fetch_timeout: float = defaults.FETCH_TIMEOUT
    hedge_after: float = defaults.HEDGE_AFTER
    capacity: int | None = None  # None: "auto" (fusenode.node.holder)
    peer_quota: int | None = None
    gc_interval: float = defaults.GC_INTERVAL
    lease_days: float = defaults.LEASE_DAYS


@dataclass(frozen=True)
class NetworkSection:
    bootstrap: tuple[str, ...] = ()
    accept_from: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()
    mdns: bool = False
    upnp: bool = False


@dataclass(frozen=True)
class PlacementSection:
    allow_weak: bool = False
    pin_timeout: float = defaults.PIN_TIMEOUT
    domain: str = "auto"


@dataclass(frozen=True)
class RepairSection:
    interval: float = defaults.REPAIR_INTERVAL
    unreachable_after: float = defaults.UNREACHABLE_AFTER
    audit_interval: float = defaults.AUDIT_INTERVAL


@dataclass(frozen=True)
class OptimizerSection:
    enabled: bool = False
    auto_optimize: bool = True
    announcers: tuple[str, ...] = ()
    device: str = "auto"
    announce: bool = True
    max_model_bytes: int | None = defaults.MAX_MODEL_BYTES
    max_seconds: float = defaults.OPTIMIZE_TIMEOUT
    max_memory: int | None = None  # None: "auto"


@dataclass(frozen=True)
class TrustSection:
    signers: tuple[str, ...] = ()  # peer IDs whose signed provenance `fusenode verify` trusts


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    api: ApiSection = field(default_factory=ApiSection)
    storage: StorageSection = field(default_factory=StorageSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    placement: PlacementSection = field(default_factory=PlacementSection)
    repair: RepairSection = field(default_factory=RepairSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    trust: TrustSection = field(default_factory=TrustSection)


_SECTIONS: dict[str, type] = {
    "node": NodeSection,
    "api": ApiSection,
    "storage": StorageSection,
    "network": NetworkSection,
    "placement": PlacementSection,
    "repair": RepairSection,
    "optimizer": OptimizerSection,
    "trust": TrustSection,
}
_ENV = {
    "FUSENODE_API_PORT": ("api", "port", int),
    "FUSENODE_SWARM_PORT": ("node", "swarm_port", int),
    "FUSENODE_K": ("storage", "k", int),
    "FUSENODE_N": ("storage", "n", int),
}


#: Keys that take a byte count: an integer, or a string with a unit ("200 GiB", "1.5 TB");
#: "auto" (None) where the key has an automatic value.
_SIZES = {
    ("storage", "capacity"): True,
    ("storage", "peer_quota"): True,
    ("optimizer", "max_model_bytes"): False,
    ("optimizer", "max_memory"): True,
}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any, where: str, auto: bool) -> int | None:
    """A byte count from the config: 123, "64 MiB", "1.5TB"; "auto" -> None when allowed."""
    if isinstance(value, bool):
        raise ConfigError(f"config: {where} must be a byte count, not {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().lower() == "auto" and auto:
        return None
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :]
        try:
            if unit not in _UNITS or not digits:
                raise ValueError
            number = int(float(digits) * _UNITS[unit])
        except ValueError:
            allowed = 'an integer, "auto" or' if auto else "an integer or"
            raise ConfigError(
                f"config: {where} {value!r} is not a byte count ({allowed} a size such as "
                '"200 GiB")'
            ) from None
    else:
        raise ConfigError(f"config: {where} must be a byte count, not {value!r}")
    if number < 0:
        raise ConfigError(f"config: {where} cannot be negative")
    return number


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"[{section}] {key}"
    if (section, key) in _SIZES:
        return parse_size(value, where, _SIZES[(section, key)])
    if isinstance(default, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(default, bool):
            raise ConfigError(f"config: {where} must be a {type(default).__name__}")
        return value
    if isinstance(default, int):
        if not isinstance(value, int):
            raise ConfigError(f"config: {where} must be an integer, not {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)):
            raise ConfigError(f"config: {where} must be a number, not {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"config: {where} must be a string, not {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config: {where} must be a list of strings")
        return tuple(value)
    raise ConfigError(f"config: {where} has an unsupported type")


def parse_config(data: dict[str, Any]) -> Config:
    sections = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"config: [{name}] must be a table")
        defaults = cls()
        unknown = set(raw) - set(defaults.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"config: unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
        values = {key: _coerce(name, key, raw[key], getattr(defaults, key)) for key in raw}
        sections[name] = cls(**values)
    unknown_sections = set(data) - set(_SECTIONS)
    if unknown_sections:
        raise ConfigError(f"config: unknown section(s): {', '.join(sorted(unknown_sections))}")
    config = Config(**sections)
    validate(config)
    return config


def validate(config: Config) -> None:
    for what, port in (
        ("[node] swarm_port", config.node.swarm_port),
        ("[api] port", config.api.port),
    ):
        if not 0 <= port <= 65535:
            raise ConfigError(f"config: {what} {port} is not a TCP port")
    s = config.storage
    try:
        validate_parameters(s.k, s.n)
    except InvalidArgument as e:
        raise ConfigError(f"config: [storage] k={s.k}, n={s.n}: {e}") from None
    if not s.k <= s.segment_size <= defaults.MAX_SEGMENT_SIZE:
        raise ConfigError(f"config: [storage] segment_size {s.segment_size} out of range")
    if s.fetch_timeout <= 0 or s.hedge_after <= 0:
        raise ConfigError("config: [storage] fetch_timeout and hedge_after must be positive")
    if s.gc_interval < 0:
        raise ConfigError("config: [storage] gc_interval cannot be negative (0: off)")
    if not s.lease_days > 0:
        raise ConfigError("config: [storage] lease_days must be positive")
    for what, value in (
        ("[placement] pin_timeout", config.placement.pin_timeout),
        ("[repair] interval", config.repair.interval),
        ("[repair] unreachable_after", config.repair.unreachable_after),
        ("[repair] audit_interval", config.repair.audit_interval),
        ("[optimizer] max_seconds", config.optimizer.max_seconds),
    ):
        if value <= 0:
            raise ConfigError(f"config: {what} must be positive")
    if config.optimizer.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config: [optimizer] device {config.optimizer.device!r}: auto|cpu|cuda")
    from fusenode.node.peerkeys import PeerAuthError, check_peer_id

    for signer in config.trust.signers:
        try:
            check_peer_id(signer)
        except PeerAuthError as e:
            raise ConfigError(f"config: [trust] signers: {e}") from None
    if config.api.max_body_bytes < 1024:
        raise ConfigError("config: [api] max_body_bytes must be at least 1024")
    if config.placement.domain not in DOMAINS:
        raise ConfigError(
            f"config: [placement] domain {config.placement.domain!r}: {' | '.join(DOMAINS)}"
        )
    try:  # the local API never leaves the machine, whatever the swarm address is
        if not ipaddress.ip_address(config.api.host).is_loopback:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"config: [api] host {config.api.host!r} must be a loopback address (127.0.0.1)"
        ) from None
    try:
        swarm_settings(config)
    except InvalidArgument as e:
        raise ConfigError(f"config: [node]/[network]: {e}") from None


#: ``[placement] domain``: what placement spreads a segment's fragments over. "auto" is
#: "node" on a loopback swarm host (every node shares 127.0.0.1) and "ip" on any other.
DOMAINS = ("auto", "node", "ip", "subnet24")


def swarm_settings(config: Config) -> SwarmSettings:
    """The embedded IPFS node's network settings this config asks for."""
    from fusenode.storage.swarm import SwarmSettings

    return SwarmSettings(
        host=config.node.swarm_host,
        port=config.node.swarm_port or None,
        announce=config.node.announce,
        deny=config.network.deny,
        mdns=config.network.mdns,
        nat_port_map=config.network.upnp,
    )


def load_config(path: Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate ``path``; apply FUSENODE_* overrides from ``env``."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (run `fusenode init`)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    config = parse_config(data)
    env = os.environ if env is None else env
    for var, (section, key, kind) in _ENV.items():
        if var in env:
            try:
                value = kind(env[var])
            except ValueError:
                raise ConfigError(f"{var}={env[var]!r} is not a valid {kind.__name__}") from None
            config = replace(config, **{section: replace(getattr(config, section), **{key: value})})
    validate(config)
    return config


def render_config(swarm_port: int, api_port: int, swarm_host: str = "127.0.0.1") -> str:
    """The documented default file with the address and ports chosen at init filled in."""
    text = DEFAULTS_PATH.read_text(encoding="utf-8")
    text = _set_first(text, 'swarm_host = "127.0.0.1"', f"swarm_host = {json.dumps(swarm_host)}")
    text = _set_first(text, "swarm_port = 0", f"swarm_port = {swarm_port}")
    text = _set_first(text, "port = 0 ", f"port = {api_port} ")
    parse_config(tomllib.loads(text))  # the file we write must load
    return text


def _set_first(text: str, old: str, new: str) -> str:
    if old not in text:
        raise ConfigError(f"default config lacks {old!r}")
    return text.replace(old, new, 1)
