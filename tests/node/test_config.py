"""config.toml: the shipped defaults load; mistakes are reported with their key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fusenode import defaults
from fusenode.node.config import Config, load_config, parse_config, render_config
from fusenode.node.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_defaults_load():
    config = parse_config(tomllib.loads((ROOT / "config.toml").read_text()))
    assert config.api.host == "127.0.0.1" and config.node.swarm_host == "127.0.0.1"
    assert (config.storage.k, config.storage.n) == (4, 6)
    assert config.network.bootstrap == ()


def test_documented_defaults_are_the_code_defaults():
    """config.toml documents fusenode.defaults: a default changed in one must change in both."""
    documented = parse_config(tomllib.loads((ROOT / "config.toml").read_text()))
    assert documented == Config()
    assert (documented.storage.k, documented.storage.n) == (defaults.K, defaults.N)
    assert documented.storage.segment_size == defaults.SEGMENT_SIZE
    assert documented.repair.unreachable_after == defaults.UNREACHABLE_AFTER
    shipped = ROOT / "node" / "default-config.toml"  # what the wheel carries
    assert shipped.read_text() == (ROOT / "config.toml").read_text()


def test_rendered_config_has_ports(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(render_config(4101, 5101))
    config = load_config(path, env={})
    assert config.node.swarm_port == 4101 and config.api.port == 5101


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[storage]\nk = 6\nn = 4\n", "k=6, n=4"),
        ("[storage]\nk = 'four'\n", "must be an integer"),
        ("[api]\nport = 70000\n", "not a TCP port"),
        ("[nope]\n", "unknown section"),
        ("[api]\nhots = 1\n", "unknown key"),
        ("[repair]\ninterval = 0\n", "must be positive"),
        ("[storage\n", "invalid TOML"),
        ('[api]\nhost = "0.0.0.0"\n', "must be a loopback address"),
        ('[node]\nswarm_host = "my.host"\n', "swarm host must be an IP address"),
        ('[network]\ndeny = ["10.0.0.0/40"]\n', "not CIDR"),
        ('[node]\nannounce = ["10.0.0.1:4001"]\n', "not a TCP multiaddr"),
        ('[placement]\ndomain = "rack"\n', "auto | node | ip | subnet24"),
        ("[storage]\nhedge_after = 0\n", "must be positive"),
        ('[storage]\ncapacity = "lots"\n', "not a byte count"),
        ('[storage]\ncapacity = "10 parsecs"\n', "not a byte count"),
        ("[storage]\npeer_quota = -1\n", "cannot be negative"),
        ("[storage]\ncapacity = true\n", "must be a byte count"),
        ('[optimizer]\nmax_model_bytes = "auto"\n', "an integer or a size"),
        ("[repair]\naudit_interval = 0\n", "must be positive"),
        ("[optimizer]\nannouncers = 3\n", "list of strings"),
    ],
)
def test_bad_config(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_env_overrides(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("")
    config = load_config(path, env={"FUSENODE_K": "2", "FUSENODE_N": "3"})
    assert (config.storage.k, config.storage.n) == (2, 3)
    with pytest.raises(ConfigError, match="FUSENODE_K"):
        load_config(path, env={"FUSENODE_K": "x"})


def test_init_configures_the_swarm_host(tmp_path):
    text = render_config(4101, 5101, "10.0.0.7")
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(path, env={})
    assert config.node.swarm_host == "10.0.0.7" and config.api.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1048576", 1048576),
        ('"auto"', None),
        ('"64 MiB"', 64 << 20),
        ('"1.5GB"', 1_500_000_000),
        ('"2 TiB"', 2 << 40),
        ('"512kb"', 512_000),
        ("0", 0),
    ],
)
def test_sizes_take_units(tmp_path, value, expected):
    path = tmp_path / "config.toml"
    path.write_text(f"[storage]\ncapacity = {value}\npeer_quota = {value}\n")
    config = load_config(path, env={})
    assert config.storage.capacity == config.storage.peer_quota == expected
