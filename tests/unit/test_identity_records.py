"""Member identities without sockets: certificates, the authority (invites, joins, revocations), a node's book of
members and the rule of who may send what, identity files, and their messages on the wire."""

from __future__ import annotations

import collections
import stat
from pathlib import Path

import msgpack
import pytest
import zmq

from mesh import (
    Authority,
    AuthorityError,
    AuthorityKey,
    Certificate,
    CertificateError,
    InviteCode,
    KnownNode,
    MemberIdentity,
    Members,
    Role,
    key_text,
    load_key,
    role_needed,
)
from protocol import (
    Admin,
    Cancel,
    Credentials,
    Fetch,
    Hello,
    Join,
    LoadReport,
    PeerAddr,
    Ping,
    Request,
    Revocations,
    Task,
    decode,
    encode,
)

NOW = 1_800_000_000.0


def curve_key() -> tuple[bytes, bytes, bytes]:
    """(public Z85, secret Z85, public raw)."""
    public, secret = zmq.curve_keypair()
    return public, secret, zmq.utils.z85.decode(public)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority.create(tmp_path / "authority")


def enrol(authority: Authority, name: str, role: Role = Role.NODE, **kw: object) -> tuple[Certificate, bytes, bytes]:
    public, secret, raw = curve_key()
    cert = authority.issue(name, raw, role, now=NOW, **kw)  # type: ignore[arg-type]
    return cert, public, secret


# ----------------------------------------------------------------- certificates


def test_a_certificate_is_checked_against_its_authority_and_any_change_breaks_it(authority: Authority) -> None:
    cert, _, _ = enrol(authority, "box-1")
    back = Certificate.decode(cert.encode(), authority.key.verify_key)
    assert (back.name, back.role, back.key) == ("box-1", Role.NODE, cert.key)
    other = AuthorityKey.generate()
    with pytest.raises(CertificateError, match="not signed by this mesh"):
        Certificate.decode(cert.encode(), other.verify_key)
    forged = Certificate("box-2", cert.key, Role.ADMIN, cert.not_before, cert.not_after, cert.serial, cert.signature)
    with pytest.raises(CertificateError):
        Certificate.decode(forged.encode(), authority.key.verify_key)
    with pytest.raises(CertificateError):
        Certificate.decode(b"\x92junk", authority.key.verify_key)


def test_a_certificate_is_valid_only_within_its_window(authority: Authority) -> None:
    cert, _, _ = enrol(authority, "box-1", valid_s=3600)
    assert cert.problem(NOW) == ""
    assert "expired" in cert.problem(NOW + 3600)
    assert "not valid yet" in cert.problem(NOW - 3600)


# ----------------------------------------------------------------- the authority


def test_an_invite_is_spent_once_and_gives_its_role_to_the_key_that_joins(authority: Authority) -> None:
    token = authority.invite(Role.CLIENT, expires_s=3600, now=NOW)
    _, _, raw = curve_key()
    cert = authority.join(token, raw, "laptop", now=NOW + 10)
    assert (cert.name, cert.role, cert.key) == ("laptop", Role.CLIENT, raw)
    _, _, raw2 = curve_key()
    with pytest.raises(AuthorityError, match="unknown or was used already"):
        authority.join(token, raw2, "laptop-2", now=NOW + 20)


def test_an_expired_invite_is_refused(authority: Authority) -> None:
    token = authority.invite(Role.NODE, expires_s=60, now=NOW)
    with pytest.raises(AuthorityError, match="expired"):
        authority.join(token, curve_key()[2], "late", now=NOW + 61)


def test_a_name_held_by_another_key_is_refused_unless_the_invite_names_it(authority: Authority) -> None:
    old, _, _ = enrol(authority, "box-1")
    token = authority.invite(Role.NODE, expires_s=60, now=NOW)
    with pytest.raises(AuthorityError, match="belongs to another key"):
        authority.join(token, curve_key()[2], "box-1", now=NOW)
    # The refusal did not spend the code: the joiner picks another name.
    assert authority.join(token, curve_key()[2], "box-2", now=NOW).name == "box-2"
    named = authority.invite(Role.NODE, expires_s=60, name="box-1", now=NOW)
    new = authority.join(named, curve_key()[2], "whatever", now=NOW)
    assert new.name == "box-1" and new.serial > old.serial
    assert authority.revocations is not None and old.key in authority.revocations.keys()


def test_revoking_signs_a_longer_list_with_a_higher_serial(authority: Authority) -> None:
    a, _, _ = enrol(authority, "a")
    b, _, _ = enrol(authority, "b")
    first = authority.revoke("a", now=NOW)
    second = authority.revoke(key_text(b.key), now=NOW)
    assert (first.serial, second.serial) == (1, 2)
    assert second.keys() == {a.key, b.key}
    with pytest.raises(AuthorityError, match="no member named"):
        authority.revoke("nobody")
    with pytest.raises(AuthorityError, match="revoked"):
        authority.issue("a-again", a.key, Role.NODE, now=NOW)


def test_the_authority_keeps_its_state_on_disk_and_never_the_token(authority: Authority, tmp_path: Path) -> None:
    token = authority.invite(Role.NODE, expires_s=600, now=NOW)
    enrol(authority, "a")
    authority.revoke("a", now=NOW)
    folder = tmp_path / "authority"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert token.hex() not in f.read_text() and str(token) not in f.read_text()
    again = Authority.open(folder)
    assert again.revocations is not None and again.revocations.serial == 1
    assert [i.name for i in again.issued()] == ["a"]
    assert again.join(token, curve_key()[2], "b", now=NOW).name == "b"


def test_an_invite_code_carries_the_node_and_authority_and_refuses_damage(authority: Authority) -> None:
    code = InviteCode("10.0.0.5:5555", b"k" * 32, authority.key.public, b"t" * 16)
    text = code.text()
    assert InviteCode.parse(f"  {text[:40]}\n{text[40:]} ") == code  # wrapped by a terminal or a chat window
    with pytest.raises(CertificateError, match="starts with"):
        InviteCode.parse(text[5:])
    with pytest.raises(CertificateError, match="damaged"):
        InviteCode.parse(text[:-10])


# ----------------------------------------------------------------- a node's book


def book(authority: Authority, tmp_path: Path | None = None, name: str = "self-node") -> Members:
    own, _, _ = enrol(authority, name)
    return Members(authority.key.verify_key, own, own.encode(), collections.Counter(), state_dir=tmp_path,
                   clock=lambda: NOW)  # fmt: skip


def test_a_certificate_is_taken_only_from_the_key_it_names(authority: Authority) -> None:
    members = book(authority)
    cert, _, _ = enrol(authority, "n1")
    member, why = members.present(cert.encode(), curve_key()[2])
    assert member is None and "another key" in why
    member, why = members.present(cert.encode(), cert.key)
    assert member is not None and (member.name, member.role) == ("n1", Role.NODE) and why == ""
    assert members.member(key_text(cert.key)) is member
    assert cert.key in members.node_keys


def test_a_second_key_claiming_a_name_is_refused_and_counted(authority: Authority) -> None:
    members = book(authority)
    first, _, _ = enrol(authority, "n1")
    members.present(first.encode(), first.key)
    # Only a forged authority could sign a second key for n1 without revoking the first; an older serial is that.
    older = authority.key.sign_certificate(Certificate("n1", curve_key()[2], Role.NODE, 0, 2**40, first.serial - 1))
    member, why = members.present(older.encode(), older.key)
    assert member is None and "belongs to another key" in why
    assert members.stats["name_refused"] == 1
    assert members.claim_problem("n1", older.key) == "the name n1 belongs to another key"
    assert members.claim_problem("n1", first.key) == ""


def test_expired_and_revoked_certificates_are_refused_and_dropped(authority: Authority, tmp_path: Path) -> None:
    members = book(authority, tmp_path)
    short, _, _ = enrol(authority, "short", valid_s=100)
    n1, _, _ = enrol(authority, "n1")
    members.present(n1.encode(), n1.key)
    assert members.present(short.encode(), short.key)[0] is not None
    members.clock = lambda: NOW + 200
    assert [m.name for m in members.expire()] == ["short"]
    assert members.present(short.encode(), short.key)[0] is None
    doc = authority.revoke("n1", now=NOW)
    gone = members.adopt(doc.encode())
    assert gone is not None and [m.name for m in gone] == ["n1"]
    assert members.member(key_text(n1.key)) is None and n1.key in members.revoked
    assert members.present(n1.encode(), n1.key)[1] == "n1's key was revoked"
    assert members.zap_admits(n1.key, gossip=False) == (False, "revoked key")
    assert members.adopt(doc.encode()) is None  # not newer: nothing happens
    # A restarted node knows the list before it hears anyone.
    again = book(authority, tmp_path, name="restarted")
    assert again.serial == doc.serial and n1.key in again.revoked


def test_a_forged_revocation_list_is_refused(authority: Authority) -> None:
    members = book(authority)
    forged = AuthorityKey.generate().sign_revocations(99, ())
    with pytest.raises(CertificateError, match="not signed"):
        members.adopt(forged.encode())


def test_only_nodes_may_subscribe_to_gossip_and_only_known_ones(authority: Authority) -> None:
    members = book(authority)
    client, _, _ = enrol(authority, "laptop", Role.CLIENT)
    members.present(client.encode(), client.key)
    assert members.zap_admits(client.key, gossip=False)[0]
    assert not members.zap_admits(client.key, gossip=True)[0]
    assert members.zap_admits(curve_key()[2], gossip=False)[0]  # a stranger may present its certificate
    assert not members.zap_admits(curve_key()[2], gossip=True)[0]


def test_each_message_needs_its_role() -> None:
    req = Request("r", "m", Task.COMPLETE, "x")
    assert role_needed(req) is Role.CLIENT
    assert role_needed(Request("r", "m", Task.COMPLETE, "x", hops=1)) is Role.NODE
    assert role_needed(Cancel("r")) is Role.CLIENT and role_needed(Ping("p")) is Role.CLIENT
    assert role_needed(Admin("a", "models")) is Role.CLIENT
    for action in ("load", "unload", "switch", "pull", "invite", "revoke"):
        assert role_needed(Admin("a", action)) is Role.ADMIN
    assert role_needed(Hello(PeerAddr("n", "10.0.0.1", 1, 2), 1)) is Role.NODE
    assert role_needed(Fetch("f", "m", "ab")) is Role.NODE
    assert role_needed(Revocations(b"x")) is Role.NODE


# ----------------------------------------------------------------- identity files


def test_an_identity_file_is_private_and_loads_back_with_the_nodes_it_knows(authority: Authority,
                                                                           tmp_path: Path) -> None:  # fmt: skip
    cert, public, secret = enrol(authority, "laptop", Role.CLIENT)
    node = KnownNode("box-1", "10.0.0.5:5555", "x" * 40)
    identity = MemberIdentity.make(cert.encode(), public, secret, authority.key.public, [node])
    path = identity.write(tmp_path / "keys" / "mesh.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = load_key(path)
    assert isinstance(back, MemberIdentity)
    assert (back.name, back.role, back.nodes, back.fingerprint) == ("laptop", Role.CLIENT, (node,),
                                                                   authority.key.fingerprint)  # fmt: skip
    assert back.node_keys.key_for("tcp://10.0.0.5:5555") == "x" * 40
    assert back.node_keys.key_for("tcp://10.0.0.6:5555") is None
    with pytest.raises(FileExistsError):
        identity.write(path)


def test_an_identity_whose_secret_is_not_its_certificates_key_is_refused(authority: Authority) -> None:
    cert, _, _ = enrol(authority, "laptop", Role.CLIENT)
    public, secret, _ = curve_key()
    with pytest.raises(ValueError, match="another key"):
        MemberIdentity.make(cert.encode(), public, secret, authority.key.public)


def test_a_node_identity_expects_its_own_key_on_its_own_machine(authority: Authority) -> None:
    cert, public, secret = enrol(authority, "box-1", Role.NODE)
    identity = MemberIdentity.make(cert.encode(), public, secret, authority.key.public)
    assert identity.node_keys.key_for("tcp://127.0.0.1:5555") == public.decode()


def test_a_client_learns_node_keys_only_from_certificates_of_this_mesh(authority: Authority) -> None:
    cert, public, secret = enrol(authority, "laptop", Role.CLIENT)
    identity = MemberIdentity.make(cert.encode(), public, secret, authority.key.public)
    good, _, _ = enrol(authority, "n1")
    client_cert, _, _ = enrol(authority, "other-laptop", Role.CLIENT)
    foreign = AuthorityKey.generate().sign_certificate(Certificate("n3", b"k" * 32, Role.NODE, 0, 2**40, 1))
    rows = [
        {"node": "n1", "address": "10.0.0.1:5555", "certificate": good.text()},
        {"node": "other-laptop", "address": "10.0.0.2:5555", "certificate": client_cert.text()},
        {"node": "n3", "address": "10.0.0.3:5555", "certificate": foreign.text()},
        {"node": "n4", "address": "10.0.0.4:5555", "certificate": good.text()},  # someone else's certificate
    ]
    assert identity.node_keys.learn_rows(rows) == 1
    assert identity.node_keys.key_for("10.0.0.1:5555") == good.key_text
    for address in ("10.0.0.2:5555", "10.0.0.3:5555", "10.0.0.4:5555"):
        assert identity.node_keys.key_for(address) is None


# ----------------------------------------------------------------- the wire


def test_identity_messages_and_keyed_addresses_round_trip() -> None:
    for msg in (Credentials(b"c" * 170, 3), Join("j1", b"t" * 16, "laptop"), Join("j2", b"t" * 16),
                Revocations(b"d" * 1000)):  # fmt: skip
        assert decode(encode(msg)) == msg
    addr = PeerAddr("n1", "10.0.0.1", 5555, 5556, "k" * 40)
    report = LoadReport("n1", 1, 2, addr, peers=(addr, PeerAddr("n2", "10.0.0.2", 5555, 5556)), revocations=7)
    assert decode(encode(report)) == report
    # A shared-key mesh's frames are what they were: an address without a key is the four fields it was.
    plain = PeerAddr("n1", "10.0.0.1", 5555, 5556)
    assert msgpack.unpackb(encode(Hello(plain, 1))[1:])[1] == ["n1", "10.0.0.1", 5555, 5556]
    with pytest.raises(ValueError):
        decode(encode(Hello(PeerAddr("n1", "10.0.0.1", 1, 2, "short"), 1)))
    assert decode(encode(Admin("a", "revoke", {"name": "n1"}))) == Admin("a", "revoke", {"name": "n1"})
