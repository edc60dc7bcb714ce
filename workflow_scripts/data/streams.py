"""What every data stage needs to work through a split batch by batch, never holding it whole.

- `ParquetSink`: a split written as batches arrive (zstd parquet), atomically: the file appears
  complete or not at all.
- `batches_of`: a parquet file read back as lists of row dicts, `BATCH_ROWS` at a time.
- `DigestSet`: normalised prompts as 128-bit digests in a sorted array (16 bytes a row), for
  deduplication and the test-in-train leak check.
- `LengthCounts`: token lengths as a counting array, exact percentiles at any size.
- `Progress`: rows done and rows/s in the stage's log and on the console.
"""

import contextlib
import hashlib
import logging
import math
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.data import sources
from workflow_scripts.files import atomic_path
from workflow_scripts.logs import mask_secrets

log = logging.getLogger("snaketune.data")

# zstd: the data stages' files are read once or twice and kept; it is ~2x smaller than snappy
# and decodes at ~1 GB/s, far from the bottleneck.
COMPRESSION = "zstd"
# Seconds between progress lines: a stage of a few seconds prints only its summary.
PROGRESS_EVERY_S = 10.0


class ParquetSink:
    """A parquet file written batch by batch through an atomic temp path (`with` block)."""

    def __init__(self, path, schema: pa.Schema | None = None):
        self.path, self.schema, self.rows = path, schema, 0
        self._stack = contextlib.ExitStack()
        self._writer = None

    def __enter__(self):
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        return self

    def write(self, data: pa.Table | pa.RecordBatch | list[dict]) -> None:
        if isinstance(data, list):
            data = pa.Table.from_pylist(data, schema=self.schema)
        if self._writer is not None and not data.num_rows:
            return
        if self._writer is None:
            self.schema = self.schema or data.schema
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression=COMPRESSION)
        self._writer.write(data if data.schema == self.schema else data.cast(self.schema))
        self.rows += data.num_rows

    def __exit__(self, *exc):
        try:
            if self._writer is None and exc[0] is None:  # no rows: an empty file with the schema
                self._writer = pq.ParquetWriter(
                    self._tmp, self.schema or pa.schema([]), compression=COMPRESSION
                )
            if self._writer is not None:
                self._writer.close()
        except BaseException:
            if not self._stack.__exit__(*sys.exc_info()):
                raise
            return False
        return self._stack.__exit__(*exc)


def batches_of(path, columns: list[str] | None = None, rows: int | None = None):
    """Rows of a parquet file as lists of dicts, ``rows`` (default `sources.BATCH_ROWS`) at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows or sources.BATCH_ROWS, columns=columns):
        yield batch.to_pylist()


def digest(text: str) -> bytes:
    """A 128-bit digest of a normalised prompt."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class DigestSet:
    """Digests seen so far, 16 bytes each, for membership at any size: a few sorted numpy arrays
    of 16-byte strings (runs of geometric sizes, searched by bisection; a new batch is merged into
    the runs no larger than it, so each digest is moved O(log n) times, never the whole set per
    batch). A Python set of the prompts would hold their whole text."""

    def __init__(self):
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def contains(self, digests: list[bytes]) -> np.ndarray:
        """A boolean per digest: seen before."""
        found = np.zeros(len(digests), dtype=bool)
        if not digests:
            return found
        query = np.array(digests, dtype="S16")
        for run in self._runs:
            at = np.searchsorted(run, query)
            inside = at < len(run)
            found[inside] |= run[at[inside]] == query[inside]
        return found

    def add(self, digests: list[bytes]) -> None:
        """Add digests not already in the set (callers add only unseen ones)."""
        if not digests:
            return
        run = np.sort(np.array(digests, dtype="S16"))
        while self._runs and len(self._runs[-1]) <= len(run):
            last = self._runs.pop()
            run = np.insert(last, np.searchsorted(last, run), run)  # a merge of two sorted arrays
        self._runs.append(run)


class LengthCounts:
    """How many examples have each token length: exact count/mean/percentiles/max at any size,
    equal to numpy's on the full list of lengths (linear interpolation, truncated to int)."""

    def __init__(self):
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, lengths) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size:
            new = np.bincount(lengths)
            if len(new) > len(self.counts):
                new[: len(self.counts)] += self.counts
                self.counts = new
            else:
                self.counts[: len(new)] += new

    def summary(self) -> dict:
        n = int(self.counts.sum())
        if not n:
            return {}
        values = np.arange(len(self.counts))
        cumulative = np.cumsum(self.counts)

        def kth(k: int) -> int:  # the k-th smallest length (0-based)
            return int(np.searchsorted(cumulative, k, side="right"))

        def percentile(q: int) -> int:
            # numpy's "linear" method: the same virtual index and the same two-sided lerp
            virtual = (q / 100) * (n - 1)
            lo = math.floor(virtual)
            a, b, t = float(kth(lo)), float(kth(min(lo + 1, n - 1))), virtual - lo
            return int(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)

        total = int((values * self.counts).sum())
        return {
            "count": n,
            "mean": round(total / n, 1),
            **{f"p{q}": percentile(q) for q in (50, 90, 95, 99)},
            "max": int(values[self.counts > 0][-1]),
        }


class Progress:
    """Rows done and rows/s, every PROGRESS_EVERY_S seconds and once at the end."""

    def __init__(self, what: str):
        self.what, self.rows = what, 0
        self._start = self._last = time.perf_counter()

    def _say(self, message: str) -> None:
        log.info("%s", message)
        if sys.__stderr__ is not None and sys.stderr is not sys.__stderr__:  # the log is a file: console too
            print(mask_secrets(f"[snaketune] {message}"), file=sys.__stderr__, flush=True)

    def update(self, rows: int) -> None:
        self.rows += rows
        now = time.perf_counter()
        if now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self._say(f"{self.what}: {self.rows:,} rows, {self.rows / (now - self._start):,.0f} rows/s")

    def done(self) -> None:
        elapsed = time.perf_counter() - self._start
        rate = self.rows / elapsed if elapsed > 0 else float("inf")
        self._say(f"{self.what}: {self.rows:,} rows in {elapsed:.1f} s ({rate:,.0f} rows/s)")
