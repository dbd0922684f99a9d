"""The wire codec: every valid message round-trips; every bad frame is refused with the codec's own error."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MAX_CHUNK_BYTES,
    MAX_DEADLINE_MS,
    RETRYABLE,
    VERSION,
    Admin,
    Cancel,
    Chunk,
    Data,
    DecodeError,
    Digest,
    Error,
    ErrorCode,
    Fetch,
    Hello,
    Leave,
    Limits,
    LoadReport,
    Member,
    ModelLoad,
    PeerAddr,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    Stage,
    StageWant,
    Suspicion,
    Task,
    decode,
    encode,
    parse_stage,
    restamp_reply,
    restamp_request,
    stage_name,
    tensor_nbytes,
)

ids = st.text(min_size=1, max_size=40)
names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,29}\Z").filter(lambda n: ".." not in n)  # protocol._names
nodes_or_none = names | st.just("")  # who answered ("" where nobody is named)
labels = st.text(max_size=20).filter(str.isprintable)  # a client's own id
small = st.integers(min_value=0, max_value=10_000)
scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
str_maps = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4)
any_maps = st.dictionaries(st.text(max_size=10), values, max_size=4)
messages_in = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=50)}),
    min_size=1,
    max_size=4,
)


chains = st.lists(st.tuples(names, names), max_size=4).map(tuple)
token_ids = st.lists(st.integers(0, 2**31 - 1), max_size=20).map(tuple)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    task = draw(st.sampled_from(list(Task)))
    inp = {
        Task.CHAT: messages_in,
        Task.COMPLETE: st.text(max_size=200),
        Task.EMBED: st.text(max_size=50) | st.lists(st.text(max_size=50), min_size=1, max_size=5),
        Task.INFER: values,
    }[task]
    return Request(
        id=draw(ids),
        model=draw(names),
        task=task,
        input=draw(inp),
        params=draw(any_maps),
        deadline_ms=draw(st.integers(1, MAX_DEADLINE_MS)),
        priority=draw(st.integers(0, 9)),
        hops=draw(st.integers(0, 8)),
        origin=draw(labels),
        stream=draw(st.booleans()),
        require=draw(str_maps),
        prefix=draw(st.text(max_size=30)),
        stages=draw(chains),
        prefix_ids=draw(token_ids),
    )


addrs = st.builds(PeerAddr, names, names, st.integers(1, 65535), st.integers(1, 65535))
tasks = st.lists(st.sampled_from(["chat", "complete", "embed", "infer"]), max_size=4, unique=True).map(tuple)
loads = st.builds(
    ModelLoad, small, small, small, st.floats(0, 1e6), st.text(alphabet="0123456789abcdef", max_size=64), tasks,
    st.integers(0, 200),
)  # fmt: skip
wants = st.builds(StageWant, st.text(alphabet="0123456789abcdef", max_size=64), st.integers(0, 2**40), st.floats(0, 64))
summaries = st.binary(max_size=32).map(lambda b: b[: len(b) // 8 * 8])
stages = st.builds(
    Stage, ids, names, st.sampled_from(["run", "token", "close"]), names, small, token_ids,
    st.lists(st.integers(0, 4096), max_size=3).map(tuple), st.sampled_from(["float32", "float16"]), st.booleans(),
    st.binary(max_size=100), chains, small, st.integers(0, MAX_DEADLINE_MS), values, st.booleans(),
)  # fmt: skip
any_message = st.one_of(
    requests(),
    st.builds(Reply, ids, values, nodes_or_none, st.text(max_size=20), small, any_maps),
    st.builds(Chunk, ids, small, values, nodes_or_none, st.text(max_size=20)),
    st.builds(
        Error, st.text(max_size=20), st.sampled_from(list(ErrorCode)), st.text(max_size=50), nodes_or_none, small
    ),
    st.builds(Reject, ids, nodes_or_none, small, st.text(max_size=20)),
    st.builds(
        LoadReport,
        names,
        st.integers(0, 2**63 - 1),
        st.integers(0, 2**63 - 1),
        addrs,
        st.dictionaries(names, loads, max_size=3),
        str_maps,
        st.lists(addrs, max_size=3).map(tuple),
        st.booleans(),
        st.text(max_size=20),
        st.dictionaries(names, summaries, max_size=2),
        st.dictionaries(names, wants, max_size=2),
        st.integers(0, 2**63 - 1),
        st.booleans(),
    ),
    st.builds(Suspicion, names, st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1), names, st.booleans()),
    st.builds(
        Digest,
        names,
        small,
        st.integers(0, 2**64 - 1),
        st.lists(
            st.builds(
                Member, addrs, st.integers(0, 2**63 - 1), small, st.sampled_from(["alive", "suspect", "dead", "left"])
            ),
            max_size=4,
        ).map(tuple),
    ),
    st.builds(Hello, addrs, st.integers(0, 2**63 - 1), st.text(max_size=20)),
    st.builds(Leave, names, st.integers(0, 2**63 - 1)),
    st.builds(Ping, ids, labels, st.booleans()),
    st.builds(Pong, ids, nodes_or_none, st.none() | st.lists(any_maps, max_size=3)),
    st.builds(Cancel, ids, st.text(max_size=40)),
    st.builds(
        Admin,
        ids,
        st.sampled_from(["models", "load", "unload", "switch", "pull"]),
        any_maps.filter(lambda m: "name" not in m and "version" not in m)
        | st.fixed_dictionaries({"name": names, "version": st.text(alphabet="0123456789abcdef", max_size=64)}),
    ),
    st.builds(
        Fetch,
        ids,
        names,
        st.text(alphabet="0123456789abcdef", min_size=1, max_size=64),
        st.text(max_size=40),
        st.integers(0, 2**40),
        st.integers(0, MAX_CHUNK_BYTES),
    ),  # fmt: skip
    st.builds(Data, ids, nodes_or_none, st.integers(0, 2**40), st.binary(max_size=200)),
    stages,
)


@settings(max_examples=400, deadline=None)
@given(any_message)
def test_every_valid_message_round_trips(msg: object) -> None:
    assert decode(encode(msg)) == msg  # type: ignore[arg-type]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_the_codec_error(data: bytes) -> None:
    for frame in (data, bytes([VERSION]) + data):
        try:
            decode(frame)
        except DecodeError:
            pass


@settings(max_examples=1000, deadline=None)
@given(st.lists(values, max_size=14))
def test_well_formed_msgpack_of_the_wrong_shape_raises_only_the_codec_error(body: list[object]) -> None:
    for tag in range(0, 16):
        try:
            decode(bytes([VERSION]) + msgpack.packb([tag, *body]))
        except DecodeError:
            pass


def _frame(body: object) -> bytes:
    return bytes([VERSION]) + msgpack.packb(body)


def test_wrong_version_byte_is_refused_with_a_clear_message() -> None:
    frame = encode(Ping("p"))
    with pytest.raises(DecodeError, match="protocol version 9 is not supported"):
        decode(bytes([9]) + frame[1:])


def test_oversized_frame_is_refused_before_parsing() -> None:
    lim = Limits(max_frame_bytes=100)
    with pytest.raises(DecodeError, match="exceeds the 100-byte limit"):
        decode(encode(Request("r", "echo", Task.COMPLETE, "x" * 200)), lim)


def test_deep_nesting_is_refused() -> None:
    deep = bytes([VERSION]) + b"\x92\x01" + b"\x91" * 5000 + b"\xc0"
    with pytest.raises(DecodeError):
        decode(deep)
    nested: object = "x"
    for _ in range(40):
        nested = [nested]
    with pytest.raises(DecodeError, match="nests deeper than 32"):
        decode(encode(Request("r", "m", Task.INFER, nested)))


def test_huge_array_header_is_refused_without_allocating() -> None:
    # An array header claiming 2**32-1 elements, followed by nothing.
    with pytest.raises(DecodeError):
        decode(bytes([VERSION]) + b"\xdd\xff\xff\xff\xff")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, "r1", "echo", "chat", "hello"], "chat input must be a non-empty list"),
        ([1, "r1", "echo", "dance", "x"], "task must be one of"),
        ([1, "r1", "", "complete", "x"], "model must not be empty"),
        ([1, "r1", "echo", "complete", 5], "prompt must be a string"),
        ([1, "r1", "echo", "complete", "x", {}, -5], "deadline_ms must be between 1 and"),
        ([1, "r1", "echo", "complete", "x", {}, 10**12], "deadline_ms must be between 1 and"),
        ([1, "r1", "echo", "complete", "x", {}, 1000, 0, 99], "hops must be between 0 and 8"),
        ([1, "r1", "echo", "complete", "x", [], 1000], "params must be a map"),
        ([1, "r1", "echo", "chat", [{"role": "robot", "content": "x"}]], "role 'robot'"),
        ([1, "r1", "echo", "embed", []], "embed input must be a string or a non-empty list"),
    ],
)
def test_bad_request_fields_are_refused_and_name_the_request(body: list[object], message: str) -> None:
    with pytest.raises(DecodeError, match=message) as info:
        decode(_frame(body))
    assert info.value.request_id == "r1"  # so the node can answer instead of dropping it
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_request_without_a_usable_id_cannot_be_answered() -> None:
    with pytest.raises(DecodeError) as info:
        decode(_frame([1, 42, "echo", "complete", "x"]))
    assert info.value.request_id is None


def test_optional_trailing_fields_take_defaults_and_extra_fields_are_ignored() -> None:
    short = decode(_frame([1, "r", "echo", "complete", "hi"]))
    assert short == Request("r", "echo", Task.COMPLETE, "hi")
    # After the two pipeline fields (stages, prefix_ids) this version knows.
    longer = decode(_frame([*msgpack.unpackb(encode(short)[1:]), [], [], "a field from a newer peer"]))
    assert longer == short


def test_a_model_load_says_its_tasks_and_an_older_peers_says_none() -> None:
    addr = PeerAddr("a", "10.0.0.1", 5555, 5556)
    report = LoadReport("a", 1, 2, addr, {"minilm": ModelLoad(0, 0, 8, 1.5, "9d83ed24", ("embed",))}, {}, (), False)
    body = msgpack.unpackb(encode(report)[1:])
    assert body[5]["minilm"] == [0, 0, 8, 1.5, "9d83ed24", ["embed"]]
    assert decode(encode(report)) == report
    body[5]["minilm"] = [0, 0, 8, 1.5, "9d83ed24"]  # as a node before tasks were gossiped sends it
    older = decode(_frame(body))
    assert isinstance(older, LoadReport) and older.models["minilm"].tasks == ()
    for bad in ("embed", ["x"] * 9, [""], [7]):
        body[5]["minilm"] = [0, 0, 8, 1.5, "9d83ed24", bad]
        with pytest.raises(DecodeError, match="model task"):
            decode(_frame(body))


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError, match="not a lanmesh message"):
        encode("hello")  # type: ignore[arg-type]


def test_a_peer_that_predates_cancel_refuses_it_as_an_unknown_type_not_a_crash() -> None:
    """Old decoders raise DecodeError on type 11: the node drops and counts the frame, so Cancel is safe to send."""
    frame = encode(Cancel("r1", "client went away"))
    assert frame[0] == VERSION and msgpack.unpackb(frame[1:])[0] == 11
    assert decode(frame) == Cancel("r1", "client went away")
    assert decode(_frame([11, "r1"])) == Cancel("r1")  # the reason is optional


def test_one_table_says_what_a_retry_can_fix() -> None:
    assert RETRYABLE == {ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE}
    assert ErrorCode.INTERNAL not in RETRYABLE  # a model that fails on a request fails on every node


def test_a_restamped_request_is_the_request_with_only_its_try_fields_changed() -> None:
    for text in ("x", "long prompt " * 500):  # small ones are packed again, big ones spliced
        req = Request("r1", "m", Task.COMPLETE, text, {"max_tokens": 7}, 9000, 2, 0, "", True, {"gpu": "true"}, "a")
        out = decode(restamp_request(encode(req), req, id="r1#2", deadline_ms=4000, hops=1, origin="n1", prefix="ab"))
        assert out == Request("r1#2", "m", Task.COMPLETE, text, {"max_tokens": 7}, 4000, 2, 1, "n1", True,
                              {"gpu": "true"}, "ab")  # fmt: skip


def test_a_restamped_reply_keeps_its_output_byte_for_byte() -> None:
    vectors = [[0.125 * i] * 384 for i in range(32)]
    reply = Reply("r1#2", vectors, "n2", "", 4, {"model": "minilm"})
    frame = encode(reply)
    out = restamp_reply(frame, reply, id="r1", route="p2c:n2<n3")
    assert decode(out) == Reply("r1", vectors, "n2", "p2c:n2<n3", 4, {"model": "minilm"})
    assert frame[20:-40] in out  # the vectors were copied, not packed again


def test_a_frame_a_foreign_encoder_wrote_is_restamped_correctly_too() -> None:
    # str16 for a short id (msgpack allows it; our encoder never writes it): the splice must not trust offsets.
    body = msgpack.packb([1, "r1", "m", "complete", "p" * 400, {}, 9000, 0, 0, "", False, {}, ""])
    long_form = body.replace(b"\xa2r1", b"\xda\x00\x02r1", 1)
    frame = bytes([VERSION]) + long_form
    req = decode(frame)
    assert isinstance(req, Request)
    out = decode(restamp_request(frame, req, id="r1#2", deadline_ms=100, hops=1, origin="n1", prefix=""))
    assert isinstance(out, Request) and out.id == "r1#2" and out.input == "p" * 400 and out.hops == 1


def test_a_load_report_from_an_older_node_reads_as_one_that_reports_every_interval() -> None:
    older = [6, "n1", 7, 3, ["n1", "10.0.0.1", 5555, 5556], {}, {}, [], False, "fp"]  # no on_change field
    report = decode(bytes([VERSION]) + msgpack.packb(older))
    assert isinstance(report, LoadReport) and report.on_change is False and report.fingerprint == "fp"


def test_a_digest_member_in_an_unknown_state_is_refused() -> None:
    body = [17, "n1", 1, 5, [[["n2", "10.0.0.2", 5555, 5556], 1, 2, "zombie"]]]
    with pytest.raises(DecodeError, match="state must be one of"):
        decode(bytes([VERSION]) + msgpack.packb(body))


def test_a_plain_request_keeps_the_thirteen_fields_older_peers_read() -> None:
    plain = Request("r1", "m", Task.COMPLETE, "hi")
    assert len(msgpack.unpackb(encode(plain)[1:])) == 13
    piped = Request("r1", "m[0-14]", Task.COMPLETE, "hi", stages=(("n1", "m[0-14]"), ("n2", "m[15-29]")),
                    prefix_ids=(5, 6))  # fmt: skip
    assert len(msgpack.unpackb(encode(piped)[1:])) == 15
    assert decode(encode(piped)) == piped


def test_a_restamped_pipeline_try_keeps_its_chain_and_tokens() -> None:
    req = Request("r1", "m[0-14]", Task.COMPLETE, "long prompt " * 50, stages=(("n1", "m[0-14]"),), prefix_ids=(7,))
    out = decode(restamp_request(encode(req), req, id="r1#2", deadline_ms=10, hops=1, origin="n0", prefix="x"))
    assert isinstance(out, Request)
    assert (out.id, out.stages, out.prefix_ids, out.prefix, out.hops) == ("r1#2", req.stages, (7,), "x", 1)


def test_stage_names_say_the_model_and_its_layers() -> None:
    assert stage_name("smollm2", 0, 14) == "smollm2[0-14]"
    assert parse_stage("smollm2[0-14]") == ("smollm2", 0, 14)
    assert parse_stage("my[model][3-4]") == ("my[model]", 3, 4)
    assert str(parse_stage("a[1-2]")) == "a[1-2]"
    for other in ("smollm2", "smollm2@abcd1234", "m[4-2]", "m[a-b]", "m[1-2]x", "[1-2]"):
        assert parse_stage(other) is None, other
    assert tensor_nbytes((2, 576), "float32") == 4608 and tensor_nbytes((), "float32") == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (3, "push", "stage kind"),
        (7, [1, -1], "stage shape"),
        (8, "int8", "stage dtype"),
        (6, [1, "a"], "tokens"),
        (10, "not bytes", "stage request"),
        (11, [["n1"]], "a .node, stage. pair"),
    ],
)
def test_bad_stage_headers_are_refused_and_name_the_sequence(field: int, value: object, message: str) -> None:
    body = msgpack.unpackb(encode(Stage("s1", "m[0-3]", "run", "n1", 0, (1,), (1, 4)))[1:])
    body[field] = value
    with pytest.raises(DecodeError, match=message) as info:
        decode(bytes([VERSION]) + msgpack.packb(body, use_bin_type=True))
    assert info.value.request_id == "s1"


def test_a_load_report_with_stages_and_wants_reaches_older_and_newer_peers() -> None:
    load = ModelLoad(1, 0, 16, 2.5, "3f7583b1", ("chat", "complete"), 30)
    report = LoadReport(
        "a", 1, 2, PeerAddr("a", "10.0.0.1", 7000, 7001),
        {"smollm2[0-18]": load, "smollm2[0-18]@3f7583b1": load, "minilm": ModelLoad(0, 0, 8)},
        revocations=5, wants={"smollm2": StageWant("3f7583b1" * 8, 300 << 20, 2.0)},
    )  # fmt: skip
    assert decode(encode(report)) == report
    body = msgpack.unpackb(encode(report)[1:])
    # On the wire: ..., prefixes, revocations (member identities), wants; a peer that knows revocations but not
    # stages reads the rest of the report.
    assert body[10:13] == [{}, 5, {"smollm2": ["3f7583b1" * 8, 300 << 20, 2.0]}]
    identities_only = decode(bytes([VERSION]) + msgpack.packb(body[:12], use_bin_type=True))
    assert isinstance(identities_only, LoadReport) and identities_only.revocations == 5 and identities_only.wants == {}
    older = decode(bytes([VERSION]) + msgpack.packb(body[:10], use_bin_type=True))  # a peer before stages
    assert isinstance(older, LoadReport) and older.wants == {} and older.models["minilm"].layers == 0
