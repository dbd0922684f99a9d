"""`transfer`: a node fetches a model it lacks from the peers that serve it, over a link capped at 200 Mbit/s.

Three sources serve a >= 100 MB ONNX model; three fresh nodes pull it in turn, each on a host whose link is shaped
with tbf to the link rate:
- clean: from every source while a steady embedding load runs on the sources; the rate against the link's, and
  the sources' serving p99 while they send against before;
- sender killed: kill -9 of one source at half way; the pull finishes from the others;
- corrupted chunks: one source's file rots on disk after it hashed it (a flipped byte in every chunk); the chunks
  it sends fail their hash, are fetched again from a sound source, and the rotten source is dropped.
Each pulled copy is compared byte for byte with the original.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .plots import plot_transfer
from .report import median, percentile, write
from .testbed import Testbed, read_events

LINK_MBIT = 200
GOAL_LINK_SHARE = 0.8  # of the link rate, for the clean pull
GOAL_P99_RATIO = 1.5  # senders' serving p99 while sending, over before
SOURCES = ("s1", "s2", "s3")
PULLERS = ("p1", "p2", "p3")
NAME = "emb"
LOAD_RATE = 100.0  # embedding requests per second, Poisson arrivals: a served LAN, not a saturated one


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _make_model(folder: Path, megabytes: float) -> tuple[Path, str]:
    from nodes.models.catalog import make_manifest

    from .model_files import make_lookup_embedder

    onnx = make_lookup_embedder(folder, megabytes=megabytes, seed=11)
    return onnx, make_manifest(NAME, "onnx-embed", folder, {})["version"]


class PullWatch:
    """`bench.modeltool pull` on the client host: its progress events (monotonic clock) and its summary."""

    def __init__(self, bed: Testbed, node: str, version: str, on_progress: Any = None) -> None:
        argv = [sys.executable, "-m", "bench.modeltool", "pull", "--node", bed.nodes[node].address, "--name", NAME,
                "--version", version]  # fmt: skip
        self.proc = bed.spawn_client(argv)
        self.events: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self._on_progress = on_progress
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for event in read_events(self.proc):
            if event["event"] == "progress":
                self.events.append(event)
                if self._on_progress is not None:
                    self._on_progress(event)
            elif event["event"] == "summary":
                self.summary = event

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError(f"the pull did not finish within {timeout:.0f}s") from None
        self._thread.join(10)
        if not self.summary:
            err = self.proc.stderr.read() if self.proc.stderr is not None else ""
            raise RuntimeError(f"the pull tool gave no summary:\n{err[-3000:]}")
        return self.summary


def _outcome(watch: PullWatch, summary: dict[str, Any], original: Path, cache: Path, version: str) -> dict[str, Any]:
    pulled = cache / "models" / "pulled" / f"{NAME}-{version[:8]}"
    intact = summary.get("state") == "done" and all(
        (pulled / f.name).is_file() and _sha(pulled / f.name) == _sha(f) for f in original.iterdir()
    )
    seconds = summary.get("seconds") or summary["wall_s"]
    t0 = watch.events[0]["t"] if watch.events else 0.0
    return {
        "state": summary.get("state"),
        "error": summary.get("error") or summary.get("reply", {}).get("error"),
        "bytes": summary.get("bytes"),
        "seconds": seconds,
        "mbit_per_s": summary["bytes"] * 8 / 1e6 / seconds if summary.get("bytes") and seconds else None,
        "from": summary.get("from"),
        "dropped": summary.get("dropped", {}),
        "corrupt_chunks": summary.get("corrupt_chunks", 0),
        "intact": intact,
        "curve": [(round(e["t"] - t0, 3), e["done"]) for e in watch.events],
    }


def _clean(bed: Testbed, version: str, original: Path, caches: dict[str, Path], pre: float, load_s: float) -> Any:
    """The first pull, from every source, while the sources serve a steady load."""
    watch: list[PullWatch] = []

    def start_pull(event: dict[str, Any]) -> None:
        if event["event"] == "tick" and not watch and event["second"] + 1 >= pre:
            watch.append(PullWatch(bed, "p1", version))

    summary, samples = bed.run_load(NAME, 0, load_s, entry=list(SOURCES), on_event=start_pull,
                                    label="clean pull + load", task="embed", rate=LOAD_RATE)  # fmt: skip
    if not watch:
        raise RuntimeError("the load ended before the pull started")
    pulled = watch[0].wait(600)
    out = _outcome(watch[0], pulled, original, caches["p1"], version)
    # Sender p99: requests that ended before the pull, against those that ended while it ran (load-gen clock).
    events = watch[0].events
    start = events[0]["t"] - summary["t0"] if events else pre
    end = (events[-1]["t"] - summary["t0"]) if events else load_s
    lat = {"before": [], "during": [], "after": []}  # type: dict[str, list[float]]
    for s, e, ok, _node in samples:
        if not ok:
            continue
        key = "before" if e < start and s > 0.5 else "during" if start <= s and e <= end else "after" if s > end else ""
        if key:
            lat[key].append((e - s) * 1000)
    out["load"] = {
        "requests": summary["ok"] + summary["failed"],
        "failed": summary["failed"],
        "rate": LOAD_RATE,
        "p99_before_ms": percentile(lat["before"], 99) if lat["before"] else None,
        "p99_during_ms": percentile(lat["during"], 99) if lat["during"] else None,
        "p99_after_ms": percentile(lat["after"], 99) if lat["after"] else None,
        "p50_before_ms": median(lat["before"]),
        "p50_during_ms": median(lat["during"]),
        "timeline": summary["timeline"],
        "pull_window_s": [start, end],
    }
    return out


def _killed(bed: Testbed, version: str, original: Path, caches: dict[str, Path]) -> dict[str, Any]:
    killed: list[float] = []

    def at_half(event: dict[str, Any]) -> None:
        if not killed and event["progress"] >= 0.5:
            bed.nodes["s1"].kill()
            killed.append(event["progress"])

    watch = PullWatch(bed, "p2", version, on_progress=at_half)
    out = _outcome(watch, watch.wait(600), original, caches["p2"], version)
    out["killed"] = "s1"
    out["killed_at_progress"] = killed[0] if killed else None
    return out


def _rotten(bed: Testbed, version: str, original: Path, rotten: Path, caches: dict[str, Path]) -> dict[str, Any]:
    # s3 has hashed its files already (it sent chunks before); make sure, then let its disk rot under it.
    bed.run_client([sys.executable, "-m", "bench.modeltool", "manifest", "--node", bed.nodes["s3"].address,
                  "--name", NAME, "--version", version])  # fmt: skip
    raw = bytearray((rotten / "model.onnx").read_bytes())
    chunk = 1024 * 1024
    flipped = 0
    for c in range(0, -(-len(raw) // chunk)):  # every chunk: all s3 sends fails its hash, whichever it is given
        raw[min(c * chunk + 7, len(raw) - 1)] ^= 0xFF
        flipped += 1
    (rotten / "model.onnx").write_bytes(bytes(raw))
    watch = PullWatch(bed, "p3", version)
    out = _outcome(watch, watch.wait(600), original, caches["p3"], version)
    out["chunks_rotten_at_s3"] = flipped
    return out


def run(quick: bool = False, mode: str = "auto") -> dict[str, Any]:
    megabytes = 24.0 if quick else 128.0
    pre, load_s = (3.0, 15.0) if quick else (5.0, 40.0)
    with Testbed(len(SOURCES) + len(PULLERS), mode) as bed:
        work = bed.log_dir / "models"
        src = work / "src"
        onnx, version = _make_model(src, megabytes)
        rotten = work / "s3-copy"
        shutil.copytree(src, rotten)
        size = sum(f.stat().st_size for f in src.iterdir())
        print(f"transfer: {NAME}@{version[:8]}, {size / 1e6:.0f} MB, sources {', '.join(SOURCES)}")
        folders = {"s1": src, "s2": src, "s3": rotten}
        for i, name in enumerate(SOURCES, start=1):
            bed.start_node(i, ["--model", f"name={NAME},path={folders[name] / onnx.name}",
                               "--cache-dir", str(work / f"cache-{name}")], name=name)  # fmt: skip
        caches = {p: work / f"cache-{p}" for p in PULLERS}
        for i, name in enumerate(PULLERS, start=len(SOURCES) + 1):
            bed.start_node(i, ["--model", "echo", "--cache-dir", str(caches[name])], name=name)
        bed.converge()
        shaped = bed.lan is not None
        if bed.lan is not None:
            for i in range(len(SOURCES) + 1, len(SOURCES) + len(PULLERS) + 1):
                bed.lan.rate(bed.lan.hosts[i], LINK_MBIT * 1000)
        print(f"  pullers' links: {f'tbf {LINK_MBIT} Mbit/s' if shaped else 'loopback, not shaped'}")
        runs = {"clean": _clean(bed, version, src, caches, pre, load_s)}
        _say("clean", runs["clean"])
        runs["sender killed"] = _killed(bed, version, src, caches)
        _say("sender killed", runs["sender killed"])
        runs["corrupted chunks"] = _rotten(bed, version, src, rotten, caches)
        _say("corrupted chunks", runs["corrupted chunks"])
        where = bed.describe()
    clean = runs["clean"]
    load = clean["load"]
    p99_ratio = (
        load["p99_during_ms"] / load["p99_before_ms"] if load["p99_during_ms"] and load["p99_before_ms"] else None
    )
    summary = {
        "bytes": size,
        "link_mbit": LINK_MBIT if shaped else None,
        "clean_mbit_per_s": clean["mbit_per_s"],
        "clean_link_share": clean["mbit_per_s"] / LINK_MBIT if shaped and clean["mbit_per_s"] else None,
        "sender_p99_ratio": p99_ratio,
        "load_failed": load["failed"],
        "killed_completed": runs["sender killed"]["intact"],
        "killed_at_progress": runs["sender killed"]["killed_at_progress"],
        "corrupt_detected": runs["corrupted chunks"]["corrupt_chunks"],
        "corrupt_completed": runs["corrupted chunks"]["intact"],
        "all_intact": all(r["intact"] for r in runs.values()),
    }
    result = {
        "model": {"name": NAME, "version": version[:8], "bytes": size, "kind": "onnx-embed (a lookup table)"},
        "testbed": where,
        "quick": quick,
        "repetitions": 1,
        "goals": {"link_share": GOAL_LINK_SHARE, "sender_p99_ratio": GOAL_P99_RATIO},
        "definitions": {
            "rate": "bytes of the model over the seconds from the pull's start to its publication, as the pulling "
            "node measured them (manifest, chunks, checks and the final whole-file hashes included)",
            "sender_p99": f"p99 of embedding requests (Poisson arrivals, {LOAD_RATE:g}/s, entering at the sources) "
            "that ran wholly while the pull ran, over those that ended before it began",
        },
        "runs": runs,
        "summary": summary,
    }
    path = write("transfer", result, plot_transfer)
    print(f"written to {path}")
    return result


def _say(what: str, r: dict[str, Any]) -> None:
    rate = f"{r['mbit_per_s']:.0f} Mbit/s" if r.get("mbit_per_s") else "-"
    extra = ""
    if "load" in r:
        lo = r["load"]
        extra = f", sources' p99 {lo['p99_before_ms'] or 0:.1f} -> {lo['p99_during_ms'] or 0:.1f} ms while sending"
    if r.get("dropped"):
        extra += ", dropped " + ", ".join(f"{k} ({v})" for k, v in r["dropped"].items())
    if r.get("corrupt_chunks"):
        extra += f", {r['corrupt_chunks']} corrupted chunks fetched again"
    print(f"  {what}: {r['state']} in {r['seconds']:.1f}s, {rate}, intact {r['intact']}{extra}")
