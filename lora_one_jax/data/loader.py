"""A deterministic training stream whose position can be saved and restored exactly.

``BatchStream`` tokenizes a split once, then serves fixed-shape batches (``pad_batch`` with bucketed
lengths) in a random order that depends only on ``seed`` and the epoch: epoch ``e`` is the permutation
``default_rng(seed + e)``. Its whole state is ``{"epoch": e, "batch": i}``, a plain dict to store in a
checkpoint; ``restore(state)`` continues with exactly the batch that would have come next.

Example:
    >>> import datasets
    >>> from lora_one_jax.models import toy_tokenizer
    >>> ds = datasets.Dataset.from_list([{"prompt": f"Q{i}", "answer": " A"} for i in range(5)])
    >>> stream = BatchStream(ds, toy_tokenizer(), 2, max_len=32, seed=0)
    >>> first = [next(stream)["input_ids"].tolist() for _ in range(3)]
    >>> state = stream.state()
    >>> after = next(stream)["input_ids"].tolist()
    >>> resumed = BatchStream(ds, toy_tokenizer(), 2, max_len=32, seed=0)
    >>> resumed.restore(state)
    >>> next(resumed)["input_ids"].tolist() == after
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

from lora_one_jax.data.batching import bucket_lengths, pad_batch, pad_id_of, pad_seq2seq_batch, tokenize


class BatchStream:
    """Endless, reproducible, checkpointable batches of a prompt/answer split (see module doc).

    Every batch has ``batch_size`` rows (epochs are cut into whole batches; the remainder of an epoch is
    dropped, as a different permutation follows) and a length from ``buckets`` (default
    ``bucket_lengths(max_len)``), so a jitted step compiles one program per bucket at most. With
    ``decoder_start_id`` (an encoder-decoder model's ``config.decoder_start_token_id``) the batches are
    ``pad_seq2seq_batch``'s: the prompt goes into the encoder, the answer comes out of the decoder.
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        tokenizer,
        batch_size: int,
        *,
        max_len: int = 512,
        buckets: Sequence[int] | None = None,
        seed: int = 0,
        decoder_start_id: int | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(ds) < batch_size:
            raise ValueError(
                f"the split has {len(ds)} examples, fewer than one batch of {batch_size}; "
                "lower the batch size or use more data"
            )
        data = tokenize(ds, tokenizer, max_len=max_len)
        self.rows = [{"input_ids": i, "prompt_len": n} for i, n in zip(data["input_ids"], data["prompt_len"])]
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.buckets = tuple(buckets) if buckets is not None else bucket_lengths(max_len)
        self.pad_id = pad_id_of(tokenizer)
        self.decoder_start_id = decoder_start_id
        self.batches_per_epoch = len(self.rows) // self.batch_size
        self.epoch, self.batch = 0, 0
        self._order = None

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng(self.seed + self.epoch).permutation(len(self.rows)))
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        order = self._permutation()
        chosen = order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        self.batch += 1
        rows = [self.rows[i] for i in chosen]
        if self.decoder_start_id is not None:
            return pad_seq2seq_batch(
                rows, pad_id=self.pad_id, decoder_start_id=self.decoder_start_id, buckets=self.buckets
            )
        return pad_batch(rows, pad_id=self.pad_id, buckets=self.buckets)

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        """The next ``n`` batches, as a list."""
        return [next(self) for _ in range(n)]

    def state(self) -> dict[str, int]:
        """``{"epoch", "batch"}``: where the stream is (JSON-serialisable)."""
        return {"epoch": int(self.epoch), "batch": int(self.batch)}

    def restore(self, state: dict) -> None:
        """Continue from a ``state()`` of a stream over the same data, batch size and seed."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"stream state {state} does not fit {self.batches_per_epoch} batches per epoch")
        self.epoch, self.batch = epoch, batch
