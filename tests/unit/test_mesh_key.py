"""The mesh key file, its fingerprint, key lookup, the ZAP decision and the request limits (no sockets)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from mesh import (
    INSECURE_ENV,
    KEY_ENV,
    CallTable,
    MeshKey,
    MeshKeyError,
    Plaintext,
    RejectionLog,
    RequestLimits,
    Unauthorized,
    client_security,
    fingerprint_of,
    handshake_failure,
    judge_zap,
    key_path,
    load_mesh_key,
    parse_txt,
    request_call,
    same_host,
    txt_for,
    zap_reply,
)
from protocol import PeerAddr, Request, Task


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------- key files


def test_a_written_key_file_is_private_and_loads_back(tmp_path: Path) -> None:
    key = MeshKey.generate()
    path = key.write(tmp_path / "keys" / "mesh.key")
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert MeshKey.load(path) == key
    assert key.fingerprint in path.read_text()  # readable by a person comparing machines


def test_keygen_refuses_to_overwrite_a_key_unless_forced(tmp_path: Path) -> None:
    path = MeshKey.generate().write(tmp_path / "mesh.key")
    before = path.read_text()
    with pytest.raises(FileExistsError, match="--force"):
        MeshKey.generate().write(path)
    assert path.read_text() == before
    replacement = MeshKey.generate()
    replacement.write(path, force=True)
    assert MeshKey.load(path) == replacement
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["mesh.key"]  # no temporary file left behind


def test_a_missing_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(MeshKeyError, match="lanmesh keygen"):
        MeshKey.load(tmp_path / "nope.key")


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = MeshKey.generate().write(tmp_path / "mesh.key")
    path.chmod(0o644)
    with pytest.raises(MeshKeyError, match="chmod 600"):
        MeshKey.load(path)


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("not = [toml", "not a lanmesh key file"),
        ('public_key = "abc"\n', "lacks public_key and secret_key"),
        ('public_key = "abc"\nsecret_key = "def"\n', "40 Z85 characters"),
        ('public_key = "' + "~" * 40 + '"\nsecret_key = "' + "a" * 40 + '"\n', "not valid Z85"),
    ],
)
def test_a_malformed_key_file_gets_a_clear_error(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "mesh.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(MeshKeyError, match=complaint) as info:
        MeshKey.load(path)
    assert str(path) in str(info.value)


def test_a_key_file_mixing_two_keys_is_refused(tmp_path: Path) -> None:
    a, b = MeshKey.generate(), MeshKey.generate()
    path = tmp_path / "mesh.key"
    path.write_text(f'public_key = "{a.public.decode()}"\nsecret_key = "{b.secret.decode()}"\n')
    path.chmod(0o600)
    with pytest.raises(MeshKeyError, match="does not belong"):
        MeshKey.load(path)


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    folder = tmp_path / "mesh.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(MeshKeyError):
        MeshKey.load(folder)


# ----------------------------------------------------------------- fingerprint


def test_fingerprint_is_32_hex_digits_of_the_public_key_hash() -> None:
    key = MeshKey.generate()
    fp = key.fingerprint
    assert len(fp) == 32 and all(c in "0123456789abcdef" for c in fp)
    assert fp == fingerprint_of(key.public)
    assert fp == MeshKey(key.public, key.secret).fingerprint  # stable
    assert MeshKey.generate().fingerprint != fp
    assert key.secret.decode() not in fp and z85.decode(key.public).hex()[:32] != fp  # a hash, not the key


def test_fingerprint_travels_in_the_mdns_txt_record() -> None:
    key = MeshKey.generate()
    addr = PeerAddr("n1", "10.0.0.5", 5555, 5556)
    txt = {k.encode(): v.encode() for k, v in txt_for(addr, key.fingerprint).items()}
    assert parse_txt(txt, ["10.0.0.5"], "n1").fingerprint == key.fingerprint


# ----------------------------------------------------------------- where the key comes from


def test_key_lookup_prefers_the_flag_then_the_env_then_the_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert key_path(None, {}) is None  # no default file yet
    default = MeshKey.generate().write(tmp_path / ".config" / "lanmesh" / "mesh.key")
    assert key_path(None, {}) == default
    assert key_path(None, {KEY_ENV: "/etc/lanmesh.key"}) == Path("/etc/lanmesh.key")
    assert key_path("/srv/k", {KEY_ENV: "/etc/lanmesh.key"}) == Path("/srv/k")


def test_no_key_anywhere_explains_keygen_and_insecure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MeshKeyError) as info:
        load_mesh_key(None, {})
    message = str(info.value)
    assert "lanmesh keygen" in message and "--insecure" in message and KEY_ENV in message


def test_a_client_uses_the_configured_key_or_plaintext(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = MeshKey.generate().write(tmp_path / "k")
    assert client_security({KEY_ENV: str(path)}) == MeshKey.load(path)
    assert isinstance(client_security({KEY_ENV: str(path), INSECURE_ENV: "1"}), Plaintext)
    assert isinstance(client_security({}), Plaintext)


# ----------------------------------------------------------------- ZAP


def _zap(mechanism: bytes, *credentials: bytes, domain: bytes = b"lanmesh", version: bytes = b"1.0") -> list[bytes]:
    return [version, b"7", domain, b"10.0.0.9", b"", mechanism, *credentials]


def test_zap_admits_exactly_the_mesh_public_key() -> None:
    mesh = z85.decode(MeshKey.generate().public)
    other = z85.decode(MeshKey.generate().public)
    ok = judge_zap(_zap(b"CURVE", mesh), mesh)
    assert ok.accepted and zap_reply(ok)[2] == b"200"
    rogue = judge_zap(_zap(b"CURVE", other), mesh)
    assert not rogue.accepted and rogue.address == "10.0.0.9" and zap_reply(rogue)[2] == b"400"
    assert zap_reply(rogue)[1] == b"7"  # the reply names the request it answers


@pytest.mark.parametrize(
    "frames",
    [
        _zap(b"NULL"),
        _zap(b"PLAIN", b"user", b"pass"),
        _zap(b"CURVE", b"x" * 32, domain=b"other"),
        _zap(b"CURVE", b"x" * 32, version=b"2.0"),
        [b"1.0", b"7"],
    ],
)
def test_zap_refuses_everything_else(frames: list[bytes]) -> None:
    mesh = z85.decode(MeshKey.generate().public)
    assert not judge_zap(frames, mesh).accepted


def test_repeated_rejections_from_one_source_are_logged_once_per_period() -> None:
    now = [0.0]
    log = RejectionLog(every=10.0, clock=lambda: now[0])
    assert log.note("auth_rejected", "10.0.0.9", "bad key") is not None
    assert log.note("auth_rejected", "10.0.0.9", "bad key") is None
    assert log.note("auth_rejected", "10.0.0.8", "bad key") is not None  # another source is news
    now[0] = 11.0
    line = log.note("auth_rejected", "10.0.0.9", "bad key")
    assert line is not None and "1 more" in line


def test_client_handshake_failures_name_the_key_problem() -> None:
    ep = "tcp://10.0.0.5:5555"
    assert "refused this client's key" in handshake_failure(ep, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert "--insecure" in handshake_failure(ep, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    assert "mesh key" in handshake_failure(ep, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def test_a_claimed_host_must_be_the_connection_address() -> None:
    assert same_host("10.0.0.5", "10.0.0.5")
    assert same_host("10.0.0.5", "::ffff:10.0.0.5")
    assert not same_host("10.0.0.5", "10.0.0.6")
    assert not same_host("10.0.0.5", "garbage")
    assert same_host("fe80::1", "fe80::1%eth0")
    assert same_host("node.local", "10.0.0.6")  # names are not resolved on the mesh loop
    assert same_host("10.0.0.5", None)  # no transport address to compare


# ----------------------------------------------------------------- request limits


def _req(task: Task, data: object, **kw: object) -> Request:
    return Request("r1", "m", task, data, **kw)  # type: ignore[arg-type]


def test_requests_within_the_limits_pass() -> None:
    limits = RequestLimits(max_prompt_chars=10, max_tokens=5, max_embed_inputs=2)
    assert limits.check(_req(Task.COMPLETE, "0123456789", params={"max_tokens": 5})) is None
    assert limits.check(_req(Task.CHAT, [{"role": "user", "content": "01234"}] * 2)) is None
    assert limits.check(_req(Task.EMBED, ["a", "b"])) is None
    assert limits.check(_req(Task.INFER, {"anything": [1, 2, 3]})) is None


@pytest.mark.parametrize(
    ("request_", "complaint"),
    [
        (_req(Task.COMPLETE, "x" * 11), "11 characters"),
        (_req(Task.COMPLETE, "x" * 6, prefix="y" * 5), "11 characters"),
        (_req(Task.CHAT, [{"role": "user", "content": "x" * 6}] * 2), "12 characters"),
        (_req(Task.EMBED, ["x" * 6, "y" * 6]), "12 characters"),
        (_req(Task.EMBED, ["a", "b", "c"]), "3 inputs to embed"),
        (_req(Task.COMPLETE, "x", params={"max_tokens": 6}), "max_tokens 6"),
        (_req(Task.COMPLETE, "x", params={"max_tokens": "lots"}), "positive integer"),
        (_req(Task.COMPLETE, "x", params={"max_tokens": True}), "positive integer"),
        (_req(Task.COMPLETE, "x", params={"max_tokens": 0}), "positive integer"),
    ],
)
def test_requests_over_a_limit_are_refused_with_the_reason(request_: Request, complaint: str) -> None:
    limits = RequestLimits(max_prompt_chars=10, max_tokens=5, max_embed_inputs=2)
    problem = limits.check(request_)
    assert problem is not None and complaint in problem


def test_plaintext_configures_nothing() -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        Plaintext().configure_client(sock)
        assert sock.getsockopt(zmq.MECHANISM) == zmq.NULL
        MeshKey.generate().configure_client(sock)
        assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
        sock.close(0)
    finally:
        ctx.term()


def test_key_files_are_never_group_or_world_readable_even_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = MeshKey.generate().write(tmp_path / "lax" / "mesh.key")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


# ----------------------------------------------------------------- a client whose key no node takes (sans-IO)


class _Outcome:
    def __init__(self) -> None:
        self.error: Exception | None = None
        self.value: object = None

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("no stream here")

    def done(self, value: object) -> None:
        self.value = value

    def fail(self, exc: Exception) -> None:
        self.error = exc


def _table(*endpoints: str) -> CallTable:
    return CallTable(endpoints, client_id="c", transmit=lambda ep, frame: True)


def _start(table: CallTable, now: float = 0.0) -> _Outcome:
    out = _Outcome()
    call = request_call(
        table.new_key(), out, "echo", "complete", "x", params=None, timeout=30, priority=0, require=None,
        stream=False, now=now,
    )  # fmt: skip
    table.start(call, now)
    return out


def test_a_final_refusal_at_every_node_fails_waiting_calls_at_once() -> None:
    table = _table("tcp://a:1", "tcp://b:1")
    out = _start(table)
    table.node_refused("tcp://a:1", "a says no", 0.1, final=True)
    assert out.error is None  # b may still take the key
    table.node_refused("tcp://b:1", "b says no", 0.2, final=True)
    assert isinstance(out.error, Unauthorized) and "a says no" in str(out.error) and "b says no" in str(out.error)
    later = _start(table, 0.3)  # no node will take this key: no point waiting for the deadline
    assert isinstance(later.error, Unauthorized)


def test_a_failed_handshake_that_may_be_retried_must_fail_twice_in_a_row() -> None:
    table = _table("tcp://a:1")
    out = _start(table)
    table.node_refused("tcp://a:1", "wrong key?", 0.1)
    assert out.error is None
    table.node_up("tcp://a:1", 0.2)  # it connected after all: the count starts over
    table.node_down("tcp://a:1", 0.3)
    table.node_refused("tcp://a:1", "wrong key?", 0.4)
    assert out.error is None
    table.node_refused("tcp://a:1", "wrong key?", 0.5)
    assert isinstance(out.error, Unauthorized)


def test_a_call_that_never_reached_a_node_after_refusals_expires_as_unauthorized() -> None:
    table = _table("tcp://a:1")
    out = _start(table)
    table.node_refused("tcp://a:1", "wrong key?", 0.1)
    table.expire(31.0)
    assert isinstance(out.error, Unauthorized)
