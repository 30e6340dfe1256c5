"""Language-model batches from one long token stream: packed training windows and eval windows.

Training (``PackedWindows``): the stream (documents joined by an end-of-text token) is cut
into windows of ``seq_len + 1`` tokens at a random offset per epoch, visited in a random
order per epoch. Batch ``s`` is a pure function of ``(seed, s)``, so the pipeline's whole
state is the next step number: saving it with the model makes a resumed run read exactly
the batches an uninterrupted run would, on any number of processes.

Evaluation (``eval_windows``): every token after the first is scored exactly once, in
non-overlapping windows or sliding windows that give each scored token more context.
"""

from __future__ import annotations

import numpy as np

from common.data.step_batches import StepBatches


class PackedWindows(StepBatches):
    """Infinite iterator of ``{"inputs", "targets"}`` int32 ``[rows, seq_len]`` batches.

    ``rows`` is this process's slice (``process_rows``) of the global ``batch_size``.
    """

    STATE_KEYS = ("seed", "seq_len", "batch_size")

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        process_rows: slice | None = None,
    ):
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
        self.num_windows = (len(tokens) - 1 - seq_len) // seq_len  # room for any offset
        if self.num_windows < 1:
            raise ValueError(
                f"the token stream ({len(tokens)} tokens) is too short for one "
                f"window of seq_len={seq_len} (+1 offset)"
            )
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rows = process_rows if process_rows is not None else slice(0, batch_size)
        self.step = 0
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_cache = (
                epoch,
                rng.permutation(self.num_windows),
                int(rng.integers(self.seq_len)),
            )
        return self._epoch_cache[1], self._epoch_cache[2]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        idx = np.arange(self.batch_size)[self.rows] + step * self.batch_size  # global samples
        starts = np.empty(len(idx), dtype=np.int64)
        for j, g in enumerate(idx):
            perm, offset = self._epoch(int(g // self.num_windows))
            starts[j] = offset + perm[g % self.num_windows] * self.seq_len
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]  # [rows, T+1]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def eval_windows(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    stride: int | None = None,
):
    """Batches ``{"inputs", "targets", "weights"}`` scoring every token of ``tokens[1:]`` once.

    Windows of ``seq_len`` inputs start every ``stride`` tokens (default ``seq_len``: no
    overlap). With ``stride < seq_len`` (sliding-window evaluation) each window after the
    first scores only its last ``stride`` targets, so every scored token sees at least
    ``seq_len - stride`` tokens of context. The last batch is padded with zero-weight rows;
    ``max_tokens`` truncates the stream. Arrays are ``[batch_size, seq_len]``.
    """
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"eval stride must be in (0, seq_len={seq_len}], got {stride}")
    tokens = np.asarray(tokens, dtype=np.int32)
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n_pred = len(tokens) - 1
    n_windows = 1 + max(0, -(-(n_pred - seq_len) // stride))
    starts = np.arange(n_windows) * stride
    padded = np.zeros(starts[-1] + seq_len + 1, dtype=np.int32)
    padded[: len(tokens)] = tokens
    offsets = np.arange(seq_len)
    for b in range(0, n_windows, batch_size):
        s = starts[b : b + batch_size]
        rows = len(s)
        inputs = np.zeros((batch_size, seq_len), np.int32)
        targets = np.zeros((batch_size, seq_len), np.int32)
        w = np.zeros((batch_size, seq_len), np.float32)
        inputs[:rows] = padded[s[:, None] + offsets]
        targets[:rows] = padded[s[:, None] + 1 + offsets]
        first_scored = np.where(s == 0, 0, seq_len - stride)[:, None]  # [rows, 1]
        target_index = s[:, None] + offsets  # index into tokens[1:]
        w[:rows] = (offsets >= first_scored) & (target_index < n_pred)
        yield {"inputs": inputs, "targets": targets, "weights": w}
