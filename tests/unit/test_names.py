"""Names of nodes and models: the one rule (`protocol._names`), and every place a name enters refusing a bad one."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from nodes.models.specs import parse_model_arg
from nodes.runtime.admin import pulled_copy
from nodes.runtime.config import NodeConfig
from protocol import (
    VERSION,
    Admin,
    DecodeError,
    Fetch,
    Hello,
    LoadReport,
    ModelLoad,
    PeerAddr,
    Reply,
    Request,
    Task,
    check_name,
    decode,
    encode,
    is_name,
)

GOOD = ["smollm2", "minilm", "echo", "sleep:50", "sleep:0.5", "sleep:1e+06", "smollm2@1a2b3c4d", "box-3f9a1c",
        "gpu1.lab", "SmolLM2-135M-Instruct.Q4_1", "all-MiniLM-L6-v2", "http@node-1", "a" * 128]  # fmt: skip
BAD = ["", "..", "../evil", "a/../../b", "a..b", "a/b", "a\\b", "/etc", ".hidden", "-flag", "_x", "x y", " x",
       "a\nb", "a\x00", "a\x1b[31m", "*", "a*", "x?", "[ab]", "{a,b}", "~root", "$HOME", "é", "a" * 129]  # fmt: skip


@pytest.mark.parametrize("name", GOOD)
def test_names_that_nodes_and_models_have_today_are_valid(name: str) -> None:
    assert is_name(name) and check_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_a_name_with_a_path_glob_control_or_odd_character_is_refused_with_the_rule(name: str) -> None:
    assert not is_name(name)
    with pytest.raises(ValueError, match="not a valid name|must not be empty|longer than 128"):
        check_name(name, "model")


def _frame(*body: object) -> bytes:
    return bytes([VERSION]) + msgpack.packb(list(body))


@pytest.mark.parametrize("name", ["../../tmp/x", "a b", "x\x00"])
def test_the_wire_refuses_a_bad_model_name_wherever_a_message_carries_one(name: str) -> None:
    addr = PeerAddr("n1", "10.0.0.1", 7000, 7001)
    report = encode(LoadReport("n1", 1, 1, addr, {"ok": ModelLoad(0, 0, 1)}, {}, (), False, ""))
    forged = report.replace(b"\xa2ok", msgpack.packb(name))
    with pytest.raises(DecodeError, match="model"):
        decode(forged)
    with pytest.raises(DecodeError, match="model") as info:
        decode(_frame(1, "r1", name, "complete", "hi"))
    assert info.value.request_id == "r1"  # the caller hears BAD_REQUEST, not silence
    with pytest.raises(DecodeError, match="model"):
        decode(encode(Admin("a1", "pull", {"name": name})))
    with pytest.raises(DecodeError, match="model"):
        decode(encode(Fetch("f1", name, "ab" * 4)))


@pytest.mark.parametrize("node", ["../n", "n/1", "", "a\x1b[2J"])
def test_the_wire_refuses_a_bad_node_name_in_gossip_hellos_and_answers(node: str) -> None:
    with pytest.raises(DecodeError, match="node"):
        decode(encode(Hello(PeerAddr(node, "10.0.0.1", 7000, 7001), 1, "")))
    with pytest.raises(DecodeError, match="node"):
        decode(encode(LoadReport(node, 1, 1, PeerAddr("n", "10.0.0.1", 1, 2), {}, {}, (), False, "")))
    if node:  # "" names nobody: allowed in answers
        with pytest.raises(DecodeError, match="node"):
            decode(encode(Reply("r1", "out", node)))


def test_versions_on_the_wire_are_hex() -> None:
    with pytest.raises(DecodeError, match="hex"):
        decode(encode(Fetch("f1", "m", "../../x")))
    with pytest.raises(DecodeError, match="hex"):
        decode(encode(Admin("a1", "switch", {"name": "m", "version": "*"})))
    assert decode(encode(Request("r", "m@1a2b3c4d", Task.COMPLETE, "x"))).model == "m@1a2b3c4d"


def test_a_node_configured_with_a_bad_name_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="node name '../x' is not a valid name"):
        NodeConfig(name="../x")
    assert is_name(NodeConfig().node_id()), "the default name (hostname + suffix) must pass the rule"


@pytest.mark.parametrize("spec", ["name=../../x,kind=echo", "name=a b,kind=echo", "/models/my model.gguf"])
def test_a_model_spec_with_a_bad_name_is_refused_saying_how_to_name_it(spec: str) -> None:
    with pytest.raises(ValueError, match="not a valid name.*name="):
        parse_model_arg(spec)


def test_a_pulled_copy_is_found_by_its_exact_name_never_by_a_pattern(tmp_path: Path) -> None:
    pulled = tmp_path / "models" / "pulled"
    for folder in ("m-1a2b3c4d", "mx-1a2b3c4d", "m-extra-1a2b3c4d"):
        (pulled / folder).mkdir(parents=True)
        (pulled / folder / "lanmesh-cache.json").write_text("{}")
    assert pulled_copy("m", tmp_path) == pulled / "m-1a2b3c4d"
    assert pulled_copy("m*", tmp_path) is None and pulled_copy("[m]x", tmp_path) is None
    assert pulled_copy("../pulled/m", tmp_path) is None
