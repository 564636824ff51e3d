"""Tasks (train / held-out splits of prompt-answer examples) and fixed-shape batches for causal LMs.

Example:
    >>> from lora_one_jax.data import load_task, batches  # doctest: +SKIP
    >>> task = load_task("asdiv")  # doctest: +SKIP
"""

from lora_one_jax.data.batching import (
    TruncationWarning,
    batches,
    bucket_lengths,
    encode,
    pad_batch,
    pad_id_of,
    pad_seq2seq_batch,
    tokenize,
    truncate,
)
from lora_one_jax.data.fingerprint import file_fingerprint, fingerprint
from lora_one_jax.data.loader import BatchStream
from lora_one_jax.data.tasks import (
    COLUMNS,
    KINDS,
    TASKS,
    DataError,
    Task,
    from_records,
    load_hf_data,
    load_task,
    read_jsonl,
    read_jsonl_rows,
)

__all__ = [
    "BatchStream",
    "COLUMNS",
    "DataError",
    "KINDS",
    "TASKS",
    "Task",
    "TruncationWarning",
    "batches",
    "bucket_lengths",
    "encode",
    "file_fingerprint",
    "fingerprint",
    "from_records",
    "load_hf_data",
    "load_task",
    "pad_batch",
    "pad_id_of",
    "pad_seq2seq_batch",
    "read_jsonl",
    "read_jsonl_rows",
    "tokenize",
    "truncate",
]
