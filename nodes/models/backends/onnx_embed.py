"""Sentence embeddings served by onnxruntime: mean pooling over the attention mask, then L2 normalisation.

An HF encoder folder is exported to ONNX once (checked against torch) and cached; serving then needs only
onnxruntime and tokenizers, not torch.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import ErrorCode, Task

from ..cache import cache_entry, cache_ready, discard_cache, publish_cache
from .base import Backend, Job, ProgressFn
from .child import ChildError, emit, run_child

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # strings per request, as OpenAI's embeddings API
MIN_COSINE = 0.9999  # the exported graph must agree with torch at least this well
DEFAULT_MAX_LENGTH = 512
_CACHE_FORMAT = "onnx-encoder-v1"
_MODEL_FILE = "model.onnx"
_VERIFY_SENTENCES = (
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly earnings rose by five percent compared with last year.",
    "Zürich, 東京 and São Paulo are cities.",
    "",
)


class OnnxEmbedder(Backend):
    """Serves EMBED: one L2-normalised vector per input string.

    `path` is an HF encoder folder (exported once and cached), a folder holding one .onnx file plus
    tokenizer.json, or an .onnx file with tokenizer.json beside it. Inputs longer than the model's
    maximum length are truncated to it (what sentence-transformers does), not refused.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        cache_dir: str | Path | None = None,
        max_batch: int = 32,
        concurrency: int = 1,
        sub_batch: int = 32,
        max_length: int | None = None,
        threads: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.tasks = frozenset({Task.EMBED})
        self.path = Path(path).expanduser()
        self.cache_dir = cache_dir
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.sub_batch = sub_batch  # strings per onnxruntime call, after sorting by length
        self.max_length = max_length
        self.threads = threads
        self.device = device
        self.loaded_from = ""  # "onnx" (given file), "export" (exported now) or "cache"
        self.cache_path: Path | None = None
        self.dimension = 0
        self.model_file: Path | None = None  # the ONNX file served
        self._session: Any = None
        self._tokenizer: Any = None
        self._inputs: list[str] = []

    # ------------------------------------------------------------ loading

    def load(self, progress: ProgressFn | None = None) -> None:
        report: ProgressFn = progress or (lambda _stage, _fraction: None)
        onnx_file = self._onnx_file()
        if onnx_file is None:
            entry = cache_entry(self.name, _weights_file(self.path), _CACHE_FORMAT, self.cache_dir)
            self.cache_path = entry
            if cache_ready(entry):
                self.loaded_from = "cache"
            else:
                report(f"{self.name}: exporting to ONNX (first start only)", 0.1)
                publish_cache(entry, lambda tmp: self._export_in_child(tmp, report))
                self.loaded_from = "export"
            onnx_file = entry / _MODEL_FILE
        else:
            self.loaded_from = "onnx"
        report(f"{self.name}: starting onnxruntime", 0.9)
        try:
            self._open(onnx_file)
        except Exception as exc:
            if self.loaded_from != "cache" or self.cache_path is None:
                raise
            # our own cached export is unreadable (truncated file, old format): export it again
            log.warning("model %s: cached export unreadable", self.name, exc_info=True)
            discard_cache(self.cache_path, f"{type(exc).__name__}: {exc}")
            self.load(progress)  # the broken entry is gone: export afresh
            return
        report(f"{self.name}: ready", 1.0)

    def _onnx_file(self) -> Path | None:
        """The ONNX file to serve directly, or None when `path` is an HF folder to export."""
        if self.path.is_file():
            if self.path.suffix != ".onnx":
                raise ValueError(f"{self.path}: expected an .onnx file or an HF encoder folder")
            return self.path
        if not self.path.is_dir():
            raise FileNotFoundError(f"model {self.name}: {self.path} does not exist")
        files = sorted(self.path.glob("*.onnx"))
        if len(files) > 1:
            raise ValueError(f"{self.path}: {len(files)} .onnx files; name the one to serve")
        if files:
            return files[0]
        if not (self.path / "config.json").exists():
            raise ValueError(f"{self.path}: no config.json or .onnx file inside")
        return None

    def _open(self, onnx_file: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = onnx_file.parent
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"model {self.name}: no tokenizer.json beside {onnx_file}")
        max_length = self.max_length or _max_length(folder)
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.no_padding()  # we pad per length bucket
        tokenizer.enable_truncation(max_length)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        providers = ["CPUExecutionProvider"]
        if self.device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(onnx_file), options, providers=providers)
        names = [i.name for i in session.get_inputs()]
        unknown = set(names) - {"input_ids", "attention_mask", "token_type_ids"}
        if "input_ids" not in names or unknown:
            raise ValueError(f"{onnx_file}: expected inputs input_ids[, attention_mask, token_type_ids], got {names}")
        self._session, self._tokenizer, self._inputs = session, tokenizer, names
        self.model_file = onnx_file
        self.max_length = max_length
        self.dimension = int(self._embed(["dimension probe"])[0][0].shape[-1])
        on_gpu = session.get_providers()[0] == "CUDAExecutionProvider"
        self.labels.update({"device": "cuda" if on_gpu else "cpu", "gpu": str(on_gpu).lower()})
        if on_gpu:
            self.labels["accelerator"] = "cuda"

    def _export_in_child(self, out: Path, report: ProgressFn) -> dict[str, Any]:
        """The export runs in a child process: torch is needed once, and the serving node never holds it."""
        args = ["--name", self.name, "--source", str(self.path), "--out", str(out)]
        if self.max_length:
            args += ["--max-length", str(self.max_length)]
        try:
            done = run_child(__name__, args, lambda stage, fraction: report(stage, 0.1 + 0.75 * fraction))
        except ChildError as exc:
            raise RuntimeError(f"model {self.name}: the ONNX export failed: {exc}") from None
        return dict(done.get("exported") or {})

    def _export(self, out: Path, report: ProgressFn) -> dict[str, Any]:
        """Export the HF encoder to `out/model.onnx` (+ tokenizer), then check it against torch (in the child)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        # eager attention: plain masked softmax, which every exporter and runtime handles the same way
        model = AutoModel.from_pretrained(self.path, local_files_only=True, attn_implementation="eager").eval()
        max_length = self.max_length or _max_length(self.path)
        sample = tokenizer(
            ["a short one", "a somewhat longer sentence to pad against"], padding=True, return_tensors="pt"
        )
        with_types = "token_type_ids" in sample and "token_type_ids" in _forward_params(model)
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max(max_length, 16))
        encoder = _encoder(model, with_types)
        report(f"{self.name}: exporting to ONNX (first start only)", 0.3)
        logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per deduplicated initializer
        with warnings.catch_warnings():
            # the exporter warns that our shared axis names are merged, which is what we want
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
            torch.onnx.export(
                encoder,
                tuple(sample[n] for n in names),
                str(out / _MODEL_FILE),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        tokenizer.save_pretrained(out)
        (out / "lanmesh-embed.json").write_text(json.dumps({"max_length": max_length}))

        report(f"{self.name}: checking the ONNX export against torch", 0.7)
        texts = list(_VERIFY_SENTENCES) + ["long " * (max_length + 20)]
        with torch.inference_mode():
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**{n: enc[n] for n in names}).last_hidden_state.numpy()
        reference = _pool(hidden, enc["attention_mask"].numpy())
        self._open(out / _MODEL_FILE)
        served, _ = self._embed(texts)
        cosines = [float(a @ b) for a, b in zip(reference, served, strict=True)]
        worst = min(cosines)
        if worst < MIN_COSINE:
            bad = texts[cosines.index(worst)][:60]
            raise RuntimeError(
                f"ONNX export of {self.name} disagrees with torch: cosine {worst:.6f} < {MIN_COSINE} on {bad!r}"
            )
        return {"source": str(self.path), "format": _CACHE_FORMAT, "max_length": max_length, "min_cosine": worst}

    def close(self) -> None:
        self._session = None

    def files(self) -> tuple[str, Path] | None:
        return None if self.model_file is None else ("onnx-embed", self.model_file.parent)

    # ------------------------------------------------------------ serving

    def run(self, batch: list[Job]) -> None:
        if self._session is None:
            for job in batch:
                job.fail(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
            return
        admitted: list[tuple[Job, list[str]]] = []
        for job in batch:
            texts = self._admit(job)
            if texts is not None:
                admitted.append((job, texts))
        if not admitted:
            return
        vectors, counts = self._embed([t for _, texts in admitted for t in texts])
        at = 0
        for job, texts in admitted:
            n = len(texts)
            tokens = int(sum(counts[at : at + n]))
            job.finish(
                [v.tolist() for v in vectors[at : at + n]],
                {"model": self.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
            )
            at += n

    def _admit(self, job: Job) -> list[str] | None:
        if job.done:
            return None
        if job.expired():
            job.fail(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the model could start")
            return None
        req = job.request
        if req.task is not Task.EMBED:
            job.fail(ErrorCode.BAD_REQUEST, f"model {self.name} serves embed, not {req.task.value}")
            return None
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            job.fail(ErrorCode.BAD_REQUEST, "embed input must be a string or a non-empty list of strings")
            return None
        if len(texts) > MAX_INPUTS:
            job.fail(ErrorCode.BAD_REQUEST, f"at most {MAX_INPUTS} strings per request, got {len(texts)}")
            return None
        return texts

    def _embed(self, texts: list[str]) -> tuple[list[np.ndarray], list[int]]:
        """Embed strings in length buckets (little padding), returning vectors and token counts in input order."""
        import numpy as np

        encodings = self._tokenizer.encode_batch(texts)
        counts = [len(e.ids) for e in encodings]
        order = sorted(range(len(texts)), key=counts.__getitem__)
        vectors: list[np.ndarray] = [np.empty(0)] * len(texts)
        for start in range(0, len(order), self.sub_batch):
            chunk = order[start : start + self.sub_batch]
            width = max(counts[i] for i in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            types = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                e = encodings[i]
                ids[row, : counts[i]] = e.ids
                mask[row, : counts[i]] = 1
                types[row, : counts[i]] = e.type_ids
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            output = self._session.run(None, {n: feed[n] for n in self._inputs})[0]
            pooled = _pool(output, mask) if output.ndim == 3 else _normalise(output)
            for row, i in enumerate(chunk):
                vectors[i] = pooled[row]
        return vectors, counts


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors the mask keeps, L2-normalised (sentence-transformers' pooling)."""
    import numpy as np

    weights = mask[..., None].astype(hidden.dtype)
    summed = (hidden * weights).sum(axis=1)
    return _normalise(summed / np.maximum(weights.sum(axis=1), 1e-9))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    import numpy as np

    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _max_length(folder: Path) -> int:
    """The longest input the model was trained for, from the files sentence-transformers and HF leave."""
    candidates = []
    for name, key in (
        ("lanmesh-embed.json", "max_length"),
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
        ("config.json", "max_position_embeddings"),
    ):
        file = folder / name
        if file.exists():
            value = json.loads(file.read_text()).get(key)
            if isinstance(value, int) and 0 < value < 100_000:  # tokenizers use 1e30 for "no limit"
                candidates.append(value)
                if name in ("lanmesh-embed.json", "sentence_bert_config.json"):
                    break
    return min(candidates) if candidates else DEFAULT_MAX_LENGTH


def _weights_file(folder: Path) -> Path:
    """The file whose size and mtime key the export cache."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return folder / name
    return folder / "config.json"


def _forward_params(model: Any) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _encoder(model: Any, with_types: bool) -> Any:
    """The HF encoder behind a fixed positional signature, returning the token vectors (what gets exported)."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if with_types:
                kwargs["token_type_ids"] = token_type_ids
            return self.model(**kwargs).last_hidden_state

    return Encoder().eval()


def main(argv: list[str] | None = None) -> int:
    """The export's child process (`python -m nodes.models.backends.onnx_embed`; internal)."""
    import argparse

    parser = argparse.ArgumentParser(description="Export an HF encoder to ONNX for lanmesh (internal).")
    parser.add_argument("--name", required=True)
    parser.add_argument("--source", required=True, help="an HF encoder folder")
    parser.add_argument("--out", required=True, help="the folder to write model.onnx and the tokenizer into")
    parser.add_argument("--max-length", type=int, default=None)
    args = parser.parse_args(argv)
    embedder = OnnxEmbedder(args.name, args.source, max_length=args.max_length)
    try:
        facts = embedder._export(Path(args.out), lambda stage, fraction: emit(stage=stage, fraction=fraction))
    except (RuntimeError, ValueError, OSError, ImportError) as exc:
        emit(error=f"{type(exc).__name__}: {exc}")
        return 1
    emit(stage="exported", fraction=1.0, exported=facts)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
