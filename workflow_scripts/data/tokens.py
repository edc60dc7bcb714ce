"""The token files training reads: `{split}.tokens.arrow`, written by format_dataset.

An Arrow IPC stream, uncompressed, so training memory-maps it (``datasets.Dataset.from_file``)
instead of holding a Python copy per process: every rank on a node shares the page cache.
Columns, one row per formatted example in the order of ``{split}.parquet``:

- ``input_ids``: list<int32>, the prompt's tokens then the completion's;
- ``prompt_length``: int32, how many of them are the prompt (labels are made by the collator);
- ``length``: int32, ``len(input_ids)`` (length grouping and packing read it without the ids).
"""

import os

import pyarrow as pa
import pyarrow.compute as pc

from workflow_scripts.stage import StageError

SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("prompt_length", pa.int32()),
        pa.field("length", pa.int32()),
    ]
)
SUFFIX = ".tokens.arrow"


class TokensWriter:
    """Append batches of examples to a token file (``path`` is usually an atomic temp path)."""

    def __init__(self, path: str | os.PathLike):
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)

    def write(self, input_ids: list[list[int]] | pa.Array, prompt_lengths: list[int] | pa.Array) -> None:
        """Append examples: Python lists, or Arrow arrays (taken without a copy to Python)."""
        if not len(input_ids):
            return
        if not isinstance(input_ids, pa.Array):
            input_ids = pa.array(input_ids, type=SCHEMA.field("input_ids").type)
        batch = pa.record_batch(
            [
                input_ids.cast(SCHEMA.field("input_ids").type),
                pa.array(prompt_lengths).cast(pa.int32()),
                pc.list_value_length(input_ids).cast(pa.int32()),
            ],
            schema=SCHEMA,
        )
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


def open_tokens(path: str | os.PathLike):
    """A token file as a memory-mapped ``datasets.Dataset`` (no copy in this process)."""
    from datasets import Dataset

    ds = Dataset.from_file(str(path), in_memory=False)
    missing = [name for name in SCHEMA.names if name not in ds.column_names]
    if missing:
        raise StageError(f"{path}: not a token file (no column {missing[0]!r}); re-run format_dataset")
    return ds
