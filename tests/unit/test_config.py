"""NodeConfig: defaults, then the TOML file, then LANMESH_* env vars, then flags; bad values say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.models.specs import parse_model_arg
from nodes.runtime.config import NodeConfig, parse_hostport, parse_labels, parse_size

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_design() -> None:
    cfg = NodeConfig.load({}, env={})
    assert (cfg.port, cfg.gossip_interval, cfg.suspect_after, cfg.dead_after) == (5555, 0.25, 1.0, 3.0)
    assert cfg.mdns is True and cfg.models == [] and cfg.peers == []


def test_flags_beat_env_which_beats_the_toml_file(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('[node]\nport = 6000\nname = "from-file"\nmodels = ["echo"]\nsuspect_after = 0.5\n')
    env = {"LANMESH_PORT": "6100", "LANMESH_PEERS": "10.0.0.1:5555, 10.0.0.2:5555", "LANMESH_MDNS": "off"}
    cfg = NodeConfig.load({"port": 6200, "name": None}, env=env, toml=str(toml))
    assert cfg.port == 6200  # flag
    assert cfg.name == "from-file"  # only the file set it; an absent flag (None) does not override
    assert cfg.peers == ["10.0.0.1:5555", "10.0.0.2:5555"]  # env list, comma-separated
    assert cfg.mdns is False
    assert cfg.models == ["echo"] and cfg.suspect_after == 0.5


def test_env_can_name_the_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "n.toml"
    toml.write_text("max_queue = 7\n")
    assert NodeConfig.load({}, env={"LANMESH_CONFIG": str(toml)}).max_queue == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LANMESH_PORT": "eighty"}, "bad value for port"),
        ({"LANMESH_MDNS": "maybe"}, "not a boolean"),
        ({"LANMESH_SUSPECT_AFTER": "5", "LANMESH_DEAD_AFTER": "3"}, "suspect_after < dead_after"),
        ({"LANMESH_MAX_QUEUE": "0"}, "max_queue must be at least 1"),
        ({"LANMESH_PEERS": "nohost"}, "is not host:port"),
        ({"LANMESH_LABELS": "gpu"}, "is not key=value"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodeConfig.load({}, env=env)


def test_unknown_or_broken_toml_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown keys \\['prot'\\]"):
        NodeConfig.load({}, env={}, toml=str(bad))
    bad.write_text("port = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        NodeConfig.load({}, env={}, toml=str(bad))
    with pytest.raises(ValueError, match="cannot read config file"):
        NodeConfig.load({}, env={}, toml=str(tmp_path / "missing.toml"))


def test_small_parsers() -> None:
    assert parse_labels("gpu=true, room = lab") == {"gpu": "true", "room": "lab"}
    assert parse_hostport("[::1]:5555") == ("::1", 5555)
    assert parse_size("512M") == 512 * 2**20 and parse_size("8GiB") == 8 * 2**30 and parse_size("1.5g") == 3 * 2**29
    assert parse_size("300MB") == 300 * 2**20 and parse_size(" 2 G ") == 2 * 2**30 and parse_size("8Gi") == 8 * 2**30
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("300", "max_memory 300 has no unit, so it would mean 300 bytes: write 300M or 300G (units K, M, G, T)"),
        ("4000", "write 4000M or 4000G"),
        ("abc", "max_memory: size 'abc' is not a number with a unit, like 512M or 8G (units K, M, G, T)"),
        ("8 GB please", "is not a number with a unit"),
        ("1K", "max_memory 1K is below 64 MiB, less than a node needs; e.g. 512M or 8G"),
        ("32M", "below 64 MiB"),
    ],
)
def test_a_memory_limit_needs_a_unit_and_a_sane_size(value: str, message: str) -> None:
    for source in ({"LANMESH_MAX_MEMORY": value}, {}):
        with pytest.raises(ValueError) as refused:
            NodeConfig.load({} if source else {"max_memory": value}, env=source)
        assert message in str(refused.value)


def test_memory_limits_with_units_or_in_plain_bytes_are_taken() -> None:
    assert NodeConfig.load({"max_memory": "8G"}, env={}).max_memory_bytes() == 8 * 2**30
    assert NodeConfig.load({"max_memory": "512MiB"}, env={}).max_memory_bytes() == 512 * 2**20
    assert NodeConfig.load({"max_memory": str(2**30)}, env={}).max_memory_bytes() == 2**30  # bytes, clearly meant


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"models": ["echo", "sleep:fast"]}, "ms must be a number"),  # the second spec: refused before the first loads
        ({"models": ["name=x,pth=/m.gguf"]}, "unknown model spec key 'pth'"),
        ({"log_level": "verbose"}, "log_level must be one of debug, info, warning, error"),
    ],
)
def test_every_value_is_checked_when_the_config_is_built(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodeConfig.load(flags, env={})


@pytest.mark.parametrize(
    ("value", "specs"),
    [
        ("smollm2,minilm", ["smollm2", "minilm"]),  # a comma list of names, as before
        ("echo, sleep:50:cap=4", ["echo", "sleep:50:cap=4"]),
        ("name=mychat,path=/srv/m.gguf", ["name=mychat,path=/srv/m.gguf"]),  # the README's spec, whole
        ("name=mychat,path=/srv/m.gguf;minilm", ["name=mychat,path=/srv/m.gguf", "minilm"]),
        ("smollm2; name=e,kind=echo,batch=4 ;", ["smollm2", "name=e,kind=echo,batch=4"]),
        (
            "smollm2,name=big,path=/m.gguf,require.gpu=true,minilm",
            ["smollm2", "name=big,path=/m.gguf,require.gpu=true", "minilm"],
        ),
        ("name=a,path=/a.gguf,name=b,path=/b.gguf", ["name=a,path=/a.gguf", "name=b,path=/b.gguf"]),  # a key repeats
    ],
)
def test_lanmesh_models_carries_specs_with_commas(value: str, specs: list[str]) -> None:
    assert NodeConfig.load({}, env={"LANMESH_MODELS": value}).models == specs


def test_a_toml_string_of_models_splits_like_the_env_and_a_list_is_taken_as_it_is(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('models = "name=x,path=/srv/x.gguf;echo"\n')
    assert NodeConfig.load({}, env={}, toml=str(toml)).models == ["name=x,path=/srv/x.gguf", "echo"]
    toml.write_text('models = ["name=x,path=/srv/x.gguf", "echo"]\n')
    assert NodeConfig.load({}, env={}, toml=str(toml)).models == ["name=x,path=/srv/x.gguf", "echo"]


def test_every_models_example_of_the_service_settings_file_parses() -> None:
    lines = (ROOT / "deploy" / "systemd" / "lanmesh.env").read_text().splitlines()
    examples = [line.removeprefix("#").partition("=")[2] for line in lines if line.startswith("#LANMESH_MODELS=")]
    assert any("path=" in e for e in examples), examples
    for value in examples:
        specs = NodeConfig.load({}, env={"LANMESH_MODELS": value}).models
        assert len(specs) == (value.count(";") + 1 if ";" in value else len(specs)), specs
        for spec in specs:
            parse_model_arg(spec)  # each one a whole spec (before: `name=...` and `path=...` apart, both refused)
