"""The mDNS TXT record: what a node announces, and how untrusted announcements are checked."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import protocol
from mesh import Announcement, Discovery, instance_name, parse_txt, txt_for
from protocol import PeerAddr

GOOD = {
    b"node": b"alpha",
    b"port": b"5555",
    b"pub_port": b"5556",
    b"version": b"1",
    b"fingerprint": b"3f9a0c",
}

node_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,59}\Z").filter(lambda n: ".." not in n)  # names' rule
ports = st.integers(1, 65535)
fingerprints = st.text("0123456789abcdefABCDEF:+/=_-.", max_size=128)


def as_props(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    # What zeroconf hands us after a round trip on the wire.
    return {k.encode(): v.encode() for k, v in txt.items()}


@given(node=node_ids, port=ports, pub_port=ports, fingerprint=fingerprints)
def test_what_a_node_announces_parses_back_to_the_same_facts(
    node: str, port: int, pub_port: int, fingerprint: str
) -> None:
    addr = PeerAddr(node, "10.0.0.7", port, pub_port)
    ann = parse_txt(as_props(txt_for(addr, fingerprint)), ["10.0.0.7"], "x.local.")
    assert ann == Announcement(addr, protocol.VERSION, fingerprint, "mdns")


def test_txt_holds_only_static_facts() -> None:
    txt = txt_for(PeerAddr("alpha", "10.0.0.7", 5555, 5556), "")
    assert set(txt) == {"node", "port", "pub_port", "version", "fingerprint"}


def test_good_announcement_is_accepted() -> None:
    ann = parse_txt(GOOD, ["10.1.2.3"], "lanmesh-alpha.local.")
    assert ann == Announcement(PeerAddr("alpha", "10.1.2.3", 5555, 5556), 1, "3f9a0c")


def test_unknown_keys_from_newer_peers_are_ignored() -> None:
    assert parse_txt({**GOOD, b"future": b"x", b"flag": None}, ["10.1.2.3"], "s").addr.node == "alpha"


def test_a_peer_speaking_another_protocol_version_is_still_reported() -> None:
    # Whether to talk to it is the caller's decision (and `lanmesh doctor` explains the mismatch).
    assert parse_txt({**GOOD, b"version": b"7"}, ["10.1.2.3"], "s").version == 7


def test_an_empty_fingerprint_means_an_insecure_mesh() -> None:
    assert parse_txt({**GOOD, b"fingerprint": b""}, ["10.1.2.3"], "s").fingerprint == ""
    assert parse_txt({**GOOD, b"fingerprint": None}, ["10.1.2.3"], "s").fingerprint == ""


@pytest.mark.parametrize("key", sorted(GOOD))
def test_announcement_missing_a_field_is_rejected(key: bytes) -> None:
    props = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(ValueError, match=key.decode()):
        parse_txt(props, ["10.1.2.3"], "s")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"node", b""),
        (b"node", None),
        (b"node", b"a\x00b"),
        (b"node", b"x" * 300),
        (b"node", b"\xff\xfe"),
        (b"port", b"0"),
        (b"port", b"65536"),
        (b"port", b"-1"),
        (b"port", b"80x"),
        (b"port", b" 80"),
        (b"port", "²".encode()),
        (b"port", b"99999999999999999999"),
        (b"pub_port", b""),
        (b"version", b"one"),
        (b"version", b"-1"),
        (b"fingerprint", b"has space"),
        (b"fingerprint", b"f" * 129),
    ],
)
def test_garbage_field_is_rejected(key: bytes, value: bytes | None) -> None:
    with pytest.raises(ValueError, match="bad lanmesh announcement from 'evil.local.'"):
        parse_txt({**GOOD, key: value}, ["10.1.2.3"], "evil.local.")


def test_non_utf8_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        parse_txt({**GOOD, b"\xff": b"1"}, ["10.1.2.3"], "s")


@pytest.mark.parametrize("addresses", [[], ["fe80::1"], ["0.0.0.0"], ["224.0.0.251"], ["255.255.255.255"], ["nope"]])
def test_announcement_without_a_usable_ipv4_address_is_rejected(addresses: list[str]) -> None:
    with pytest.raises(ValueError, match="IPv4"):
        parse_txt(GOOD, addresses, "s")


def test_first_usable_ipv4_address_is_the_host() -> None:
    assert parse_txt(GOOD, ["garbage", "fe80::1", "10.9.9.9", "10.1.1.1"], "s").addr.host == "10.9.9.9"


@given(
    props=st.dictionaries(
        st.sampled_from(sorted(GOOD)) | st.binary(max_size=8), st.none() | st.binary(max_size=20), max_size=8
    ),
    addresses=st.lists(st.text(max_size=20) | st.sampled_from(["10.0.0.1", "::1"]), max_size=3),
)
def test_any_input_either_parses_or_raises_value_error(props: dict[bytes, bytes | None], addresses: list[str]) -> None:
    try:
        ann = parse_txt(props, addresses, "s")
    except ValueError:
        return
    assert 1 <= ann.addr.port <= 65535 and 1 <= ann.addr.pub_port <= 65535
    assert ann.addr.node


def test_node_id_too_long_for_a_txt_entry_cannot_be_announced() -> None:
    with pytest.raises(ValueError, match="longer than a TXT entry"):
        txt_for(PeerAddr("n" * 260, "10.0.0.7", 5555, 5556), "")


def test_discovery_refuses_a_host_it_cannot_announce_as_an_a_record() -> None:
    for host in ["my-laptop", "0.0.0.0", "::1"]:
        with pytest.raises(ValueError, match="IPv4"):
            Discovery(PeerAddr("a", host, 5555, 5556), on_found=print, on_lost=print)


@given(node=node_ids)
def test_instance_name_fits_one_dns_label_with_room_for_our_host_prefix(node: str) -> None:
    name = instance_name(node)
    assert 0 < len(("lanmesh-" + name).encode()) <= 63
    assert re.fullmatch(r"[A-Za-z0-9-]+", name)


def test_instance_name_is_the_node_id_when_dns_safe_and_distinct_otherwise() -> None:
    assert instance_name("worker-7") == "worker-7"
    assert instance_name("a.b") != instance_name("a_b")
    assert instance_name("x" * 80) != instance_name("x" * 81)


@pytest.mark.parametrize("node", ["../x", "a b", "a/b", "*"])
def test_an_announced_node_id_follows_the_rule_for_names(node: str) -> None:
    props = {b"node": node.encode(), b"port": b"5555", b"pub_port": b"5556", b"version": b"1", b"fingerprint": b""}
    with pytest.raises(ValueError, match="not a valid name"):
        parse_txt(props, ["10.0.0.7"], "s")
