"""The pieces the streamed data stages are built from (workflow_scripts/data/streams.py)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflow_scripts.data.streams import DigestSet, LengthCounts, ParquetSink, digest


def numpy_summary(lengths) -> dict:
    """What format_dataset computed before it streamed: numpy on the whole list of lengths."""
    arr = np.asarray(lengths)
    return {
        "count": int(arr.size),
        "mean": round(float(arr.mean()), 1),
        **{f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 95, 99)},
        "max": int(arr.max()),
    }


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001, 20_000])
def test_length_counts_equal_numpy_percentiles(n):
    rng = np.random.default_rng(n)
    # gappy, skewed lengths: most short, a long tail, some values never seen
    lengths = np.concatenate([rng.integers(5, 40, n - n // 5), rng.integers(500, 4000, n // 5)])
    rng.shuffle(lengths)
    counts = LengthCounts()
    for chunk in np.array_split(lengths, 7):  # in batches, as the stage adds them
        counts.add(chunk.tolist())
    assert counts.summary() == numpy_summary(lengths)


def test_length_counts_of_nothing_is_empty():
    counts = LengthCounts()
    counts.add([])
    assert counts.summary() == {}


def test_digest_set_finds_what_was_added_across_batches():
    seen = DigestSet()
    first = [digest(f"prompt {i}") for i in range(100)]
    seen.add(first[:60])
    seen.add(first[60:])
    assert seen.contains(first).all() and len(seen) == 100
    others = [digest(f"other {i}") for i in range(50)]
    assert not seen.contains(others).any()
    mixed = [first[3], others[0], first[99], others[1]]
    assert seen.contains(mixed).tolist() == [True, False, True, False]
    assert DigestSet().contains(first[:3]).tolist() == [False, False, False]


def test_digest_is_128_bits_and_normalisation_is_the_callers():
    assert len(digest("a b")) == 16
    assert digest("a b") != digest("a  b")  # preprocess normalises whitespace and case before hashing


def test_digest_set_stays_sorted_over_many_small_batches():
    seen = DigestSet()
    rng = np.random.default_rng(0)
    added = []
    for b in range(40):
        batch = [digest(f"{b}-{i}-{rng.integers(1 << 30)}") for i in range(int(rng.integers(1, 30)))]
        seen.add(batch)
        added += batch
    assert seen.contains(added).all() and len(seen) == len(added)


def test_parquet_sink_writes_batches_as_one_file(tmp_path):
    schema = pa.schema([("a", pa.string()), ("n", pa.int64())])
    path = tmp_path / "out" / "x.parquet"
    with ParquetSink(path, schema) as sink:
        sink.write([{"a": "1", "n": 1}, {"a": None, "n": 2}])
        sink.write([])  # a batch whose rows were all filtered out
        sink.write(pa.table({"a": ["3"], "n": [3]}))
    assert pq.read_table(path).to_pylist() == [{"a": "1", "n": 1}, {"a": None, "n": 2}, {"a": "3", "n": 3}]
    assert sink.rows == 3


def test_parquet_sink_with_no_rows_writes_the_schema(tmp_path):
    schema = pa.schema([("a", pa.string())])
    with ParquetSink(tmp_path / "empty.parquet", schema):
        pass
    table = pq.read_table(tmp_path / "empty.parquet")
    assert table.num_rows == 0 and table.schema.names == ["a"]


def test_parquet_sink_keeps_nothing_when_the_block_fails(tmp_path):
    schema = pa.schema([("a", pa.string())])
    with (
        pytest.raises(RuntimeError, match="boom"),
        ParquetSink(tmp_path / "sub" / "x.parquet", schema) as sink,
    ):
        sink.write([{"a": "1"}])
        raise RuntimeError("boom")
    assert not (tmp_path / "sub").exists()  # no file, no temp, not even the folder made for it


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_bad_byte_after_a_byte_order_mark_is_named_as_it_is(tmp_path, suffix):
    from workflow_scripts.data.sources import SourceError, read_rows

    path = tmp_path / f"bom{suffix}"
    first = b'{"q": "caf\xe9"}\n' if suffix == ".jsonl" else b"q\ncaf\xe9\n"
    path.write_bytes(b"\xef\xbb\xbf" + first)
    line = 1 if suffix == ".jsonl" else 2
    with pytest.raises(SourceError, match=rf"bom{suffix}: not UTF-8 \(byte 0xe9 on line {line}\)"):
        read_rows(path)
