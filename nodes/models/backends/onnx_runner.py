"""The chat engine's runner: it owns the onnxruntime session and the key/value arrays, and carries out what the
scheduler planned (copies between slots, the arrays' shape, one prompt chunk, one decode step). It decides nothing.

The arrays hold the keys and values of every layer, [rows, kv_heads, length, head_size] each, one row (slot) per
request; the model reads and writes them in place (past and present bound to the same memory). They are sized to
what the scheduler planned and no larger: the memory of a request's cache is spent as it grows, within the cap the
scheduler keeps. A step costs more with a longer cache even where it is empty (measured: 8192 vs 1024 tokens, one
stream 35 vs 51 tokens/s), which is why the length grows with the requests instead of starting at the context.

The prefix cache's pool is apart from them: per layer, keys and values of `blocks` blocks of `block_tokens` tokens,
[kv_heads, blocks, block_tokens, head_size], made once in anonymous memory that the OS maps a 4 KiB page at a time on
first write (`_lazy_zeros`; numpy asks for huge pages on large arrays, and a block's few KiB then took 2 MiB in each
of the 2 x layers x heads places it lands: SmolLM2 after 8 short chats held 800 MiB instead of 546), so an unused
pool costs no memory and a used one what it holds; it never grows. A block is copied out of a request's row when
the scheduler keeps it, and a reused prefix is copied into the row of the request that takes it: one copy per layer
for a whole chain (measured: a 768-token prefix of SmolLM2 in about 10 ms, against about 2.3 s to read it again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class KVLayout:
    """What one token costs in the cache, from the model's shape."""

    layers: int
    heads: int  # key/value heads
    head_size: int
    itemsize: int  # bytes per number (4: float32, 2: float16)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_size * self.itemsize


class OnnxRunner:
    """One model's session and key/value arrays; used by the engine thread only."""

    def __init__(
        self,
        session: Any,
        names: list[tuple[str, str, str, str]],
        layout: KVLayout,
        dtype: Any,
        vocab_size: int,
        positions: bool,
    ) -> None:
        self.session = session
        self.names = names  # (past key, past value, present key, present value) per layer
        self.layout = layout
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.positions = positions  # the graph takes position_ids
        self.rows = 0
        self.length = 0
        self.arrays: list[tuple[np.ndarray, np.ndarray]] = []
        self._bindings: dict[tuple[int, int], Any] = {}
        self.pool: list[tuple[np.ndarray, np.ndarray]] = []  # the prefix cache's blocks, per layer
        self.block_tokens = 0

    @property
    def bytes_held(self) -> int:
        return self.rows * self.length * self.layout.bytes_per_token

    # ------------------------------------------------------------ the arrays

    def resize(self, rows: int, length: int) -> None:
        """The arrays as exactly `rows` x `length` tokens, keeping what the common part holds."""
        import numpy as np

        if (rows, length) == (self.rows, self.length):
            return
        if rows == 0 or length == 0:
            self.release()
            return
        shape = (rows, self.layout.heads, length, self.layout.head_size)
        keep_rows, keep_length = min(rows, self.rows), min(length, self.length)
        olds, self.arrays = self.arrays, []
        self._bindings.clear()
        arrays = []
        for layer in range(len(self.names)):
            pair = (np.zeros(shape, self.dtype), np.zeros(shape, self.dtype))
            if olds:
                old = olds[layer]
                olds[layer] = None  # type: ignore[call-overload]  # freed before the next layer's arrays are made
                if keep_rows and keep_length:
                    pair[0][:keep_rows, :, :keep_length] = old[0][:keep_rows, :, :keep_length]
                    pair[1][:keep_rows, :, :keep_length] = old[1][:keep_rows, :, :keep_length]
                del old
            arrays.append(pair)
        self.arrays, self.rows, self.length = arrays, rows, length
        self._bindings.clear()

    def release(self) -> None:
        """Give the arrays' memory back (nothing is held)."""
        self.arrays, self.rows, self.length = [], 0, 0
        self._bindings.clear()

    def move(self, src: int, dst: int, tokens: int) -> None:
        """Copy one request's cache to another slot."""
        for keys, values in self.arrays:
            keys[dst, :, :tokens] = keys[src, :, :tokens]
            values[dst, :, :tokens] = values[src, :, :tokens]

    # ------------------------------------------------------------ the prefix cache's pool

    def open_pool(self, blocks: int, block_tokens: int) -> None:
        """A pool of `blocks` blocks (0: none); what an earlier pool held is dropped."""

        self.pool, self.block_tokens = [], block_tokens
        if blocks <= 0:
            return
        shape = (self.layout.heads, blocks, block_tokens, self.layout.head_size)
        self.pool = [(_lazy_zeros(shape, self.dtype), _lazy_zeros(shape, self.dtype)) for _ in self.names]

    def save_blocks(self, row: int, start: int, slots: list[int]) -> None:
        """Copy tokens [start, start + len(slots) * block_tokens) of a row into those pool slots."""
        b, n = self.block_tokens, len(slots)
        heads, size = self.layout.heads, self.layout.head_size
        for (keys, values), (pool_k, pool_v) in zip(self.arrays, self.pool, strict=True):
            pool_k[:, slots] = keys[row, :, start : start + n * b].reshape(heads, n, b, size)
            pool_v[:, slots] = values[row, :, start : start + n * b].reshape(heads, n, b, size)

    def load_blocks(self, row: int, slots: list[int]) -> None:
        """Copy a chain of pool slots into a row, from its first token on."""
        b, n = self.block_tokens, len(slots)
        heads, size = self.layout.heads, self.layout.head_size
        for (keys, values), (pool_k, pool_v) in zip(self.arrays, self.pool, strict=True):
            keys[row, :, : n * b] = pool_k[:, slots].reshape(heads, n * b, size)
            values[row, :, : n * b] = pool_v[:, slots].reshape(heads, n * b, size)

    def _binding(self, start: int, n: int) -> Any:
        """An IOBinding with the cache of slots [start, start + n) bound as past and present."""
        key = (start, n)
        binding = self._bindings.get(key)
        if binding is None:
            from onnxruntime import OrtValue

            binding = self.session.io_binding()
            for (past_k, past_v, present_k, present_v), (keys, values) in zip(self.names, self.arrays, strict=True):
                k = OrtValue.ortvalue_from_numpy(keys[start : start + n])
                v = OrtValue.ortvalue_from_numpy(values[start : start + n])
                binding.bind_ortvalue_input(past_k, k)
                binding.bind_ortvalue_input(past_v, v)
                binding.bind_ortvalue_output(present_k, k)
                binding.bind_ortvalue_output(present_v, v)
            self._bindings[key] = binding
        return binding

    # ------------------------------------------------------------ running the model

    def prefill(self, slot: int, tokens: list[int], start: int) -> np.ndarray:
        """Read `tokens` of one prompt into `slot` after its first `start` tokens; the logits of the last one."""
        import numpy as np

        total = start + len(tokens)
        ids = np.asarray(tokens, dtype=np.int64)[None, :]
        mask = np.ones((1, total), dtype=np.int64)
        positions = np.arange(start, total, dtype=np.int64)[None, :]
        return self._run(self._binding(slot, 1), ids, mask, positions)[0, -1]

    def decode(self, tokens: list[int], cached: list[int]) -> np.ndarray:
        """One token for each of the rows in slots 0..n-1 (row i holds `cached[i]` tokens); logits [n, vocab]."""
        import numpy as np

        n = len(tokens)
        ids = np.asarray(tokens, dtype=np.int64)[:, None]
        lengths = np.asarray(cached, dtype=np.int64)
        width = int(lengths.max()) + 1
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        return self._run(self._binding(0, n), ids, mask, lengths[:, None])[:, -1]

    def _run(self, binding: Any, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        import numpy as np

        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.positions:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        shape = [ids.shape[0], ids.shape[1], self.vocab_size]
        logits = np.empty(shape, dtype=np.float32 if self.dtype == np.float32 else np.float16)
        binding.bind_output("logits", "cpu", 0, logits.dtype, shape, logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits

    def perplexity(self, ids: list[int], chunk: int) -> tuple[float, int]:
        """exp(mean negative log-likelihood) of `ids` after the first, on arrays of its own (the engine's are left
        alone: call it while the engine is not serving)."""
        import numpy as np

        scratch = OnnxRunner(self.session, self.names, self.layout, self.dtype, self.vocab_size, self.positions)
        scratch.resize(1, len(ids))
        nll, done = 0.0, 0
        while done < len(ids) - 1:
            part = ids[done : done + chunk]
            total = done + len(part)
            logits = scratch._run(
                scratch._binding(0, 1),
                np.asarray(part, dtype=np.int64)[None, :],
                np.ones((1, total), dtype=np.int64),
                np.arange(done, total, dtype=np.int64)[None, :],
            )[0].astype(np.float64)
            targets = ids[done + 1 : total + 1]
            scores = logits[: len(targets)]
            top = scores.max(axis=-1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(scores - top).sum(axis=-1))
            nll += float((log_z - scores[np.arange(len(targets)), targets]).sum())
            done = total
        return float(np.exp(nll / (len(ids) - 1))), len(ids) - 1


def _lazy_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros in anonymous memory that takes no huge pages: the OS maps each 4 KiB page on its first write."""
    import mmap

    import numpy as np

    size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):  # no such advice here (a kernel without huge pages has none to give)
        pass
    return np.frombuffer(memory, dtype=dtype).reshape(shape)  # the array keeps the mapping alive
