"""Derived tables (documents/, clean/, chunks/) as directories of Parquet shards.

A shard is at most `max_shard_bytes` on disk and is made of row groups of at most
`row_group_bytes` of Arrow data, so a streaming reader (`datasets` with `streaming=True`, the Hub's
dataset viewer) holds one modest row group at a time. Shards are named as the Hub names the splits
of a dataset, `{split}-00000-of-00003.parquet`, which `datasets.load_dataset("parquet",
data_files=...)` and the Hub's automatic split detection both read.

A table is written into a staging directory under OUTPUT/.scratch/ and swapped into place when it is
complete (two renames), so a reader sees either the previous complete table or the new one, and a
writer that dies leaves only scratch files, which the next writer removes.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist.store.chunks import fsync_dir
from nougat_dist.store.layout import OutputDir

log = logging.getLogger(__name__)

#: Largest shard on disk (compressed): a few hundred MB is what the Hub and `datasets` handle well.
MAX_SHARD_BYTES = 256 * 1024 * 1024
#: Largest row group, in bytes of Arrow data (uncompressed): what a streaming reader holds at once.
ROW_GROUP_BYTES = 32 * 1024 * 1024
SPLIT = "train"


def shard_name(split: str, index: int, count: int) -> str:
    """`train-00000-of-00003.parquet`: the Hub's naming for the shards of one split."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def shard_glob(dirname: str, split: str = SPLIT) -> str:
    """The data_files pattern of a sharded table, relative to OUTPUT (for the dataset card)."""
    return f"{dirname}/{split}-*.parquet"


def increment_name(split: str, increment: int, index: int) -> str:
    """`train-i00004-00000.parquet`: shard `index` of increment `increment` of a table that grows
    while the job runs (--overlap-post); sorts in publication order."""
    return f"{split}-i{increment:05d}-{index:05d}.parquet"


def shard_paths(directory: Path, split: str = SPLIT) -> list[Path]:
    """The shards of a table, in order (empty when it was never written): the Hub-style
    `train-00000-of-00003.parquet` of a table written whole, or the `train-i00000-00000.parquet`
    increments of one written while the job ran."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{split}-*.parquet")
                  if p.name.count("-of-") == 1 or p.name.startswith(f"{split}-i"))


def increment_paths(directory: Path, increment: int, split: str = SPLIT) -> list[Path]:
    """The shards one increment added to a table (see `increment_name`)."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{split}-i{increment:05d}-*.parquet"))


def iter_batches(directory: Path, columns: list[str] | None = None,
                 batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Record batches of a sharded table in order, one row group in memory at a time."""
    for path in shard_paths(directory):
        with pq.ParquetFile(path) as f:
            yield from f.iter_batches(batch_size=batch_size, columns=columns)


def num_rows(directory: Path) -> int:
    """Rows of a sharded table, from the shard footers."""
    return sum(pq.read_metadata(p).num_rows for p in shard_paths(directory))


def scratch_dir(out_dir: Path, stage: str) -> Path:
    """OUTPUT/.scratch/<stage>: emptied, then created. Staging shards and spill files go here."""
    d = OutputDir(out_dir).scratch / stage
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def whole_groups(batches: Iterator[pa.RecordBatch], key: str) -> Iterator[pa.Table]:
    """Tables of complete groups from batches sorted by `key` (a group may span batches: the
    last group of a batch waits for the next batch). Memory: one batch plus one group."""
    import numpy as np

    carry: pa.Table | None = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        if table.num_rows == 0:
            continue
        table = table.combine_chunks()
        keys = table.column(key).to_numpy()
        last_start = int(np.flatnonzero(keys == keys[-1])[0])
        if last_start > 0:
            yield table.slice(0, last_start)
        carry = table.slice(last_start)
    if carry is not None and carry.num_rows:
        yield carry


def group_starts(table: pa.Table, key: str) -> "list[int]":
    """Row index where each group of a table sorted by `key` starts."""
    import numpy as np

    keys = table.column(key).to_numpy()
    return [0, *(np.flatnonzero(keys[1:] != keys[:-1]) + 1).tolist()] if len(keys) else []


def clear_scratch(out_dir: Path, *stages: str) -> None:
    """Remove the scratch dirs of `stages` (and OUTPUT/.scratch itself once it is empty)."""
    root = OutputDir(out_dir).scratch
    for stage in stages:
        shutil.rmtree(root / stage, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:
        pass  # another stage's files are still there, or it was never made


class ShardWriter:
    """Write one table as size-bounded Parquet shards, then swap it into `target` at close().

    Rows are appended with write(); a row group is flushed when the buffered Arrow data reaches
    `row_group_bytes`, and a shard is closed once its file reaches `max_shard_bytes`. A table with
    no rows still gets one (empty) shard, so its schema and its place in the card exist.

    With `increment=N` the shards are added to `target` instead (named by `increment_name`, the
    other shards left alone), and an increment without rows adds no file.
    """

    def __init__(self, target: Path, schema: pa.Schema, staging: Path, *, split: str = SPLIT,
                 max_shard_bytes: int | None = None, row_group_bytes: int | None = None,
                 max_shard_rows: int | None = None, increment: int | None = None) -> None:
        self.target = target
        self.increment = increment
        self.schema = schema
        self.split = split
        self.max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
        self.row_group_bytes = ROW_GROUP_BYTES if row_group_bytes is None else row_group_bytes
        self.max_shard_rows = max_shard_rows
        self._shard_flushed_rows = 0  # rows written to the open shard
        self._buffered_rows = 0
        self.staging = staging / target.name
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self._parts: list[Path] = []
        self._file = None
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        """Append rows (any schema that casts to the table's)."""
        if data.num_rows == 0:
            return
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        data = data.cast(self.schema) if data.schema != self.schema else data
        while data.num_rows:
            take = data.num_rows
            if self.max_shard_rows is not None:
                take = min(take, self.max_shard_rows - self._open_rows())
            for batch in data.slice(0, take).to_batches():
                self._buffer.append(batch)
                self._buffered += batch.nbytes
                self._buffered_rows += batch.num_rows
            self.rows += take
            data = data.slice(take)
            if self.max_shard_rows is not None and self._open_rows() >= self.max_shard_rows:
                self._flush()
                self._close_shard()
            elif self._buffered >= self.row_group_bytes:
                self._flush()

    def _open_rows(self) -> int:
        return self._shard_flushed_rows + self._buffered_rows

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            path = self.staging / f"part-{len(self._parts):05d}.parquet"
            self._parts.append(path)
            self._file = open(path, "wb")
            self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._shard_flushed_rows += table.num_rows
        self._buffer, self._buffered, self._buffered_rows = [], 0, 0
        if self._file.tell() >= self.max_shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        self._shard_flushed_rows = 0
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._writer, self._file = None, None

    def close(self) -> list[Path]:
        """Finish the last shard, name the shards, and replace `target` with them (or, for an
        increment, add them to it)."""
        self._flush()
        if self.increment is not None:
            return self._close_increment()
        if not self._parts:  # no rows at all: one empty shard carries the schema
            self._writer = pq.ParquetWriter(self.staging / "part-00000.parquet", self.schema,
                                            compression="zstd")
            self._parts.append(self.staging / "part-00000.parquet")
            self._writer.close()
            self._writer = None
        self._close_shard()
        names = []
        for i, part in enumerate(self._parts):
            name = self.staging / shard_name(self.split, i, len(self._parts))
            part.rename(name)
            names.append(self.target / name.name)
        fsync_dir(self.staging)
        replace_dir(self.staging, self.target)
        return names

    def _close_increment(self) -> list[Path]:
        self._close_shard()
        self.target.mkdir(parents=True, exist_ok=True)
        names = []
        for i, part in enumerate(self._parts):
            # One rename per shard: a crash between two leaves some of the increment's shards,
            # which its stage removes before doing the increment again (stages/overlap.py).
            name = self.target / increment_name(self.split, self.increment or 0, i)
            os.replace(part, name)
            names.append(name)
        fsync_dir(self.target)
        shutil.rmtree(self.staging, ignore_errors=True)
        return names

    def abort(self) -> None:
        """Drop what was staged; `target` is left as it was."""
        self._buffer = []
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._file.close()
                self._writer = None
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`, replacing what is there (a directory or an old file).

    Two renames: the old one aside (into the scratch dir `new` lives in), the new one in. A crash
    between them leaves no `target`, which the next run of the same stage writes again."""
    aside = new.parent / f"{new.name}.old"
    shutil.rmtree(aside, ignore_errors=True)
    if target.is_dir() and not target.is_symlink():
        os.rename(target, aside)
    elif target.exists() or target.is_symlink():
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(new, target)
    fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
