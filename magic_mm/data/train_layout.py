"""Training data: sub-datasets in VLM2Vec's MMEB-train layout, streamed, and mixtures of them.

Public API (small on purpose; converters write what ``open_subdataset`` reads):

- ``SubDataset``: one sub-dataset of a mixture (a file, its image root, a sampling weight,
  per-side instructions, an optional row limit, stage-3 judge question, stage-1 kind/prompt).
- ``open_subdataset(spec) -> SubDatasetReader``: ``len(reader)``, ``reader.rows(indices)``
  (random access by row number) and ``iter(reader)`` (every row in order), both streaming.
- ``MixtureSampler``: which sub-dataset and which of its rows make the batch of step ``s``;
  a pure function of ``(seed, step)``.
- ``write_rows(records, path)``: write MMEB-train-layout records as .parquet or .jsonl.

The layout (one file per sub-dataset, one row per training pair)::

    qry             query text ("" = none); "<|image_1|>"-style placeholders are removed
    qry_image_path  query image, relative to the sub-dataset's image_root ("" = none)
    pos_text        positive candidate's text ("" = none)
    pos_image_path  positive candidate's image ("" = none)
    neg_text        optional: a hard negative's text, or a list of them
    neg_image_path  optional: a hard negative's image, or a list (zipped with neg_text)

Files: ``.parquet`` or ``.jsonl`` (one JSON object per line, the same keys; the custom-data
format).  Two CSV forms the project already reads are sub-datasets too: an image–caption
folder (``captions.csv`` + ``images/``: the caption is the query, its image the positive) and
an image–label CSV (``image,label``: the image is the query, the label text the positive).

Streaming.  A reader never holds a whole file: rows live in *blocks* of at most
``block_rows`` consecutive rows (parquet: row groups, split when larger; JSONL: runs of lines
whose starting byte offsets are found in one pass at open).  ``rows()`` decodes only the
blocks its rows fall in (the last two stay cached); images are only checked to exist, and
opened later by whoever embeds the batch.  Memory is one or two blocks plus one integer per
block, whatever the file's size.

Order.  ``MixtureSampler`` draws step ``s``'s sub-dataset from the weights with a generator
seeded by ``(seed, s // 4096)``; the batch is the next ``batch_size`` positions of that
sub-dataset's own endless stream (the number of earlier steps that drew it times the batch
size).  Each epoch of a stream is a seeded permutation of its blocks, and inside each block a
seeded permutation of its rows, so reads stay local while every row comes once per epoch.
"""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from magic_mm.data.mmeb import Item, clean_text
from magic_mm.errors import UserError

COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
REQUIRED = COLUMNS[:4]
FORMATS = ("mmeb", "captions", "labels")
KINDS = ("caption", "instruction", "text")  # stage 1's data kinds
# Stage 1's default prompt per kind; "{text}" is the row's query text.
KIND_PROMPTS = {"caption": "Describe the image in one sentence.", "instruction": "{text}", "text": "{text}"}
DEFAULT_BLOCK_ROWS = 4096
_CHOICE_CHUNK = 4096  # steps whose sub-dataset draws share one generator


class TrainDataError(UserError):
    """A training sub-dataset that is missing, unreadable, or not in the training layout."""


@dataclass
class SubDataset:
    """One sub-dataset of a training mixture (a ``datasets:`` entry of a training config)."""

    file: str  # .parquet / .jsonl in the MMEB-train layout, a caption folder, or an image,label .csv
    name: str | None = None  # shown in logs and keys; default: the file's stem
    image_root: str | None = None  # image paths are relative to it; default: the file's folder (captions: images/)
    weight: float = 1.0  # sampling weight of this sub-dataset's batches
    query_instruction: str | None = None  # None = the model's default; "" = none
    candidate_instruction: str | None = None
    limit: int | None = None  # use only the first N rows
    judge_question: str | None = None  # stage 3: "{query}" / "{candidate}" are the texts; None = stage3.judge.question
    kind: str | None = None  # stage 1: caption | instruction | text (None: guessed from the first row)
    prompt: str | None = None  # stage 1: the prompt of this kind (None: KIND_PROMPTS[kind])
    split: str | None = None  # caption folders only: keep this split (splits.csv)
    format: str | None = None  # mmeb | captions | labels (None: from the file)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        path = Path(self.file)
        return path.name if path.is_dir() else path.stem

    def validate(self, where: str) -> None:
        if self.weight < 0:
            raise TrainDataError(f"{where}: weight {self.weight} is negative; use a weight >= 0")
        if self.limit is not None and self.limit < 1:
            raise TrainDataError(f"{where}: limit {self.limit}; give a positive row count or leave it out")
        if self.kind is not None and self.kind not in KINDS:
            raise TrainDataError(f"{where}: kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.format is not None and self.format not in FORMATS:
            raise TrainDataError(f"{where}: format {self.format!r}; use one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class TrainRow:
    """One training pair: a query, its positive, and the file's own hard negatives (if any)."""

    index: int  # row number in the file (0-based, blank JSONL lines not counted)
    query: Item
    positive: Item
    negatives: tuple[Item, ...] = ()


# -- values -------------------------------------------------------------------------------
def _text(value: Any) -> str | None:
    return clean_text(value) if isinstance(value, str) or value is None else clean_text(str(value))


def _rel(value: Any) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _listish(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    return [value]


class SubDatasetReader:
    """Streams one sub-dataset's rows; see the module docstring."""

    def __init__(self, spec: SubDataset, block_rows: int = DEFAULT_BLOCK_ROWS, base: str | Path | None = None,
                 check_images: bool = True, records: list[dict[str, Any]] | None = None) -> None:
        """``records``: the rows themselves, given inline (small in-memory sub-datasets); ``file`` is then
        only a label."""
        self.spec = spec
        self.check_images = check_images
        self.name = spec.label
        path = Path(spec.file)
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        self.path = path
        self.block_rows = block_rows
        self.format = "mmeb" if records is not None else spec.format or self._guess_format()
        default_root = path / "images" if self.format == "captions" else path.parent
        root = Path(spec.image_root) if spec.image_root else default_root
        if base is not None and spec.image_root and not root.is_absolute():
            root = Path(base) / root
        self.image_root = root
        self._cache: OrderedDict[int, list[TrainRow]] = OrderedDict()
        self._memory: list[dict[str, Any]] | None = records  # CSV forms: small, read whole
        self._parquet = None
        if records is not None:
            pass
        elif self.format == "captions":
            self._memory = self._read_captions()
        elif self.format == "labels":
            self._memory = self._read_labels()
        elif path.suffix == ".parquet":
            self._open_parquet()
        else:
            self._open_jsonl()
        if self._memory is not None:
            total = len(self._memory)
            self.num_rows = total if spec.limit is None else min(total, spec.limit)
            self.blocks = fixed_blocks(self.num_rows, block_rows)
        if self.num_rows == 0:
            raise TrainDataError(f"{self.path}: sub-dataset {self.name!r} has no rows")
        self.block_starts = np.cumsum([0] + [size for size in self.blocks[:-1]]).tolist()

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"SubDatasetReader({self.name!r}, {self.path}, {self.num_rows} rows)"

    # -- opening ----------------------------------------------------------------------------
    def _guess_format(self) -> str:
        path = self.path
        if path.is_dir():
            return "captions"
        if path.suffix == ".csv":
            return "labels"
        if path.suffix in (".parquet", ".jsonl", ".json"):
            return "mmeb"
        if not path.exists():
            raise TrainDataError(f"{path}: no such file; check the 'file' entry of sub-dataset {self.spec.label!r}")
        raise TrainDataError(f"{path}: unknown sub-dataset type; use .parquet or .jsonl (MMEB-train layout), "
                             "an image,label .csv, or a folder with captions.csv and images/")

    def _missing(self) -> None:
        if not self.path.is_file():
            raise TrainDataError(f"{self.path}: no such file; check the 'file' entry of sub-dataset {self.name!r}")

    def _open_parquet(self) -> None:
        import pyarrow.parquet as pq

        self._missing()
        try:
            handle = pq.ParquetFile(self.path, buffer_size=1 << 20)
        except Exception as exc:  # pyarrow raises several error types
            raise TrainDataError(f"{self.path}: not a readable parquet file ({exc})") from None
        names = handle.schema_arrow.names
        self._check_columns(names)
        self._columns = [c for c in COLUMNS if c in names]
        self._parquet = handle
        meta = handle.metadata
        limit = self.spec.limit
        self.blocks, self._block_where = [], []  # block → (row group, first row inside it)
        taken = 0
        for g in range(meta.num_row_groups):
            size = meta.row_group(g).num_rows
            for start in range(0, size, self.block_rows):
                n = min(self.block_rows, size - start)
                if limit is not None:
                    n = min(n, limit - taken)
                if n <= 0:
                    break
                self.blocks.append(n)
                self._block_where.append((g, start))
                taken += n
        self.num_rows = taken

    def _open_jsonl(self) -> None:
        """One pass over the bytes: the offset and line number where each block starts."""
        self._missing()
        limit = self.spec.limit
        self.blocks, self._block_where = [], []  # block → (byte offset, line number)
        rows, offset = 0, 0
        with self.path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    if limit is not None and rows >= limit:
                        break
                    if rows % self.block_rows == 0:
                        self.blocks.append(0)
                        self._block_where.append((offset, number))
                    self.blocks[-1] += 1
                    if rows == 0:
                        self._check_columns(list(self._json(line, number, 0)))
                    rows += 1
                offset += len(line)
        self.num_rows = rows

    def _check_columns(self, names: Sequence[str]) -> None:
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise TrainDataError(
                f"{self.path}: missing column(s) {', '.join(missing)}; a training sub-dataset needs "
                f"{', '.join(REQUIRED)} (optionally neg_text, neg_image_path), \"\" where a part is absent")

    def _json(self, line: bytes, number: int, row: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainDataError(f"{self.path}, row {row} (line {number}): not valid JSON ({exc.msg}); "
                                 "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise TrainDataError(f"{self.path}, row {row} (line {number}): each line must be a JSON object")
        return record

    def _read_captions(self) -> list[dict[str, Any]]:
        from magic_mm.data.captions import read_captioned_images

        records = []
        for item in read_captioned_images(self.path, self.spec.split):
            records += [{"qry": caption, "qry_image_path": "", "pos_text": "", "pos_image_path": item.image}
                        for caption in item.captions]
        return records

    def _read_labels(self) -> list[dict[str, Any]]:
        self._missing()
        with self.path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not {"image", "label"} <= set(reader.fieldnames or []):
                raise TrainDataError(f"{self.path}: needs the columns image,label; found {reader.fieldnames}")
            return [{"qry": "", "qry_image_path": row["image"] or "", "pos_text": row["label"] or "",
                     "pos_image_path": ""} for row in reader]

    # -- rows ---------------------------------------------------------------------------------
    def _where(self, index: int) -> str:
        """How errors name row ``index`` (JSONL rows get their line number where they are read)."""
        if self.format == "captions":
            return f"{self.path / 'captions.csv'}, caption {index}"
        if self.format == "labels":
            return f"{self.path}, row {index} (line {index + 2})"
        return f"{self.path}, row {index}"

    def _row(self, record: dict[str, Any], index: int, where: str) -> TrainRow:
        root = self.image_root

        def image(value: Any) -> Path | None:
            rel = _rel(value)
            return root / rel if rel is not None else None

        query = Item(None, _text(record.get("qry")), image(record.get("qry_image_path")))
        positive = Item(None, _text(record.get("pos_text")), image(record.get("pos_image_path")))
        for side, item in (("query (qry, qry_image_path)", query), ("positive (pos_text, pos_image_path)", positive)):
            if item.text is None and item.image is None:
                raise TrainDataError(f"{where}: the {side} has neither a text nor an image; "
                                     "fill one of the two columns or drop the row")
        texts, images = _listish(record.get("neg_text")), _listish(record.get("neg_image_path"))
        n = max(len(texts), len(images))
        texts += [None] * (n - len(texts))
        images += [None] * (n - len(images))
        negatives = tuple(Item(None, _text(t), image(i)) for t, i in zip(texts, images))
        negatives = tuple(item for item in negatives if item.text is not None or item.image is not None)
        row = TrainRow(index, query, positive, negatives)
        if self.check_images:
            self._check_images(row, where)
        return row

    def _check_images(self, row: TrainRow, where: str) -> None:
        """Raise if one of the row's images does not exist (images are not opened here)."""
        for label, item in (("qry_image_path", row.query), ("pos_image_path", row.positive),
                            *(("neg_image_path", n) for n in row.negatives)):
            if item.image is not None and not item.image.is_file():
                raise TrainDataError(
                    f"{where}: {label} {item.image} not found under the image root "
                    f"{self.image_root}; fix the path in the file, or set image_root of sub-dataset "
                    f"{self.name!r} to the folder the image paths are relative to")

    def _decode_block(self, b: int) -> list[TrainRow]:
        size = self.blocks[b]
        start = self.block_starts[b]
        if self._memory is not None:
            return [self._row(rec, start + i, self._where(start + i))
                    for i, rec in enumerate(self._memory[start : start + size])]
        if self._parquet is not None:
            group, first = self._block_where[b]
            out: list[dict[str, Any]] = []
            position = 0
            for batch in self._parquet.iter_batches(batch_size=self.block_rows, row_groups=[group],
                                                    columns=self._columns, use_threads=False):
                lo, hi = max(first - position, 0), min(first + size - position, batch.num_rows)
                if lo < hi:
                    out += batch.slice(lo, hi - lo).to_pylist()
                position += batch.num_rows
                if position >= first + size:
                    break
            return [self._row(rec, start + i, self._where(start + i)) for i, rec in enumerate(out)]
        offset, number = self._block_where[b]
        rows: list[TrainRow] = []
        with self.path.open("rb") as fh:
            fh.seek(offset)
            while len(rows) < size:
                line = fh.readline()
                if not line:
                    raise TrainDataError(f"{self.path}: the file changed while training read it; restart the run")
                if line.strip():
                    index = start + len(rows)
                    where = f"{self.path}, row {index} (line {number})"
                    rows.append(self._row(self._json(line, number, index), index, where))
                number += 1
        return rows

    def block(self, b: int) -> list[TrainRow]:
        """Block ``b``'s rows (decoded at most once while it stays among the two most recent)."""
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        rows = self._decode_block(b)
        self._cache[b] = rows
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return rows

    def block_of(self, index: int) -> int:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for {self.name!r} ({self.num_rows} rows)")
        return int(np.searchsorted(self.block_starts, index, side="right")) - 1

    def rows(self, indices: Sequence[int]) -> list[TrainRow]:
        """The rows at ``indices`` (in that order); each block touched is decoded once."""
        by_block: dict[int, list[int]] = {}
        for index in indices:
            by_block.setdefault(self.block_of(int(index)), []).append(int(index))
        found: dict[int, TrainRow] = {}
        for b, wanted in by_block.items():
            rows = self.block(b)
            for index in wanted:
                found[index] = rows[index - self.block_starts[b]]
        return [found[int(i)] for i in indices]

    def __iter__(self) -> Iterator[TrainRow]:
        """Every row in file order, one block at a time (not cached: a full pass stays flat)."""
        for b in range(len(self.blocks)):
            yield from (self._cache[b] if b in self._cache else self._decode_block(b))


def fixed_blocks(n: int, block_rows: int) -> list[int]:
    """Sizes of ``n`` items cut into blocks of ``block_rows`` (the last one shorter)."""
    return [min(block_rows, n - start) for start in range(0, n, block_rows)]


def open_subdataset(spec: SubDataset, block_rows: int = DEFAULT_BLOCK_ROWS, base: str | Path | None = None,
                    check_images: bool = True) -> SubDatasetReader:
    """Open one sub-dataset for streaming (relative paths resolve against ``base``, default the cwd).

    With ``check_images`` every decoded row's images must exist (checked, not opened): a missing
    one raises ``TrainDataError`` naming the file, the row and the fix.
    """
    spec.validate(f"sub-dataset {spec.label!r}")
    return SubDatasetReader(spec, block_rows, base, check_images)


def guess_kind(row: TrainRow) -> str:
    """Stage 1's kind of a row: an image with a text → caption (no query text) or instruction;
    no image at all → text."""
    if row.query.image is None and row.positive.image is None:
        return "text"
    if row.query.image is not None and row.query.text is not None and row.positive.text is not None:
        return "instruction"
    return "caption"


# -- mixtures -------------------------------------------------------------------------------
class MixtureSampler:
    """Step → (sub-dataset, its row positions): a pure function of ``(seed, stream, step)``.

    ``blocks[d]`` are sub-dataset ``d``'s block sizes (consecutive positions ``0..n_d``);
    ``weights[d]`` its sampling weight (a sub-dataset without rows is never drawn).
    """

    def __init__(self, blocks: Sequence[Sequence[int]], weights: Sequence[float], batch_size: int,
                 seed: int = 0, stream: int = 0) -> None:
        if len(blocks) != len(weights) or not blocks:
            raise ValueError("one weight per sub-dataset, at least one sub-dataset")
        self.blocks = [list(b) for b in blocks]
        self.sizes = [sum(b) for b in self.blocks]
        w = np.array([float(x) if n else 0.0 for x, n in zip(weights, self.sizes)])
        if (w < 0).any() or w.sum() <= 0:
            raise TrainDataError(f"sub-dataset weights {list(weights)}: need weights >= 0 and at least one "
                                 "sub-dataset with rows and a positive weight")
        self.p = w / w.sum()
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.starts = [np.cumsum([0] + b[:-1]).astype(np.int64) for b in self.blocks]
        self._counts: list[np.ndarray] = [np.zeros(len(blocks), dtype=np.int64)]  # draws before chunk c
        self._chunk: tuple[int, np.ndarray] | None = None
        self._epochs: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._inner: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    def _choices(self, chunk: int) -> np.ndarray:
        if self._chunk is None or self._chunk[0] != chunk:
            rng = np.random.default_rng([self.seed, self.stream, 7, chunk])
            self._chunk = (chunk, rng.choice(len(self.p), size=_CHOICE_CHUNK, p=self.p))
        return self._chunk[1]

    def source(self, step: int) -> int:
        """The sub-dataset that step ``step``'s batch comes from."""
        if len(self.p) == 1:
            return 0
        chunk, offset = divmod(step, _CHOICE_CHUNK)
        return int(self._choices(chunk)[offset])

    def draws_before(self, step: int) -> np.ndarray:
        """How many steps before ``step`` drew each sub-dataset."""
        if len(self.p) == 1:
            return np.array([step])
        chunk, offset = divmod(step, _CHOICE_CHUNK)
        while len(self._counts) <= chunk:
            c = len(self._counts) - 1
            self._counts.append(self._counts[c] + np.bincount(self._choices(c), minlength=len(self.p)))
        return self._counts[chunk] + np.bincount(self._choices(chunk)[:offset], minlength=len(self.p))

    def _epoch(self, d: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        key = (d, epoch)
        if key not in self._epochs:
            order = np.random.default_rng([self.seed, self.stream, d, epoch]).permutation(len(self.blocks[d]))
            ends = np.cumsum(np.asarray(self.blocks[d], dtype=np.int64)[order])
            self._epochs[key] = (order, ends)
            while len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return self._epochs[key]

    def _within(self, d: int, epoch: int, b: int) -> np.ndarray:
        key = (d, epoch, b)
        if key not in self._inner:
            self._inner[key] = np.random.default_rng([self.seed, self.stream, d, epoch, b]).permutation(self.blocks[d][b])
            while len(self._inner) > 8:
                self._inner.popitem(last=False)
        return self._inner[key]

    def position(self, d: int, p: int) -> int:
        """Row position at place ``p`` of sub-dataset ``d``'s endless stream."""
        epoch, offset = divmod(p, self.sizes[d])
        order, ends = self._epoch(d, epoch)
        k = int(np.searchsorted(ends, offset, side="right"))
        b = int(order[k])
        inside = offset - (int(ends[k - 1]) if k else 0)
        return int(self.starts[d][b] + self._within(d, epoch, b)[inside])

    def batch(self, step: int) -> tuple[int, list[int]]:
        """(sub-dataset, the ``batch_size`` row positions of step ``step``)."""
        d = self.source(step)
        first = int(self.draws_before(step)[d]) * self.batch_size
        return d, [self.position(d, p) for p in range(first, first + self.batch_size)]


# -- writing --------------------------------------------------------------------------------
def write_rows(records: Iterable[dict[str, Any]], path: str | Path, row_group_rows: int = DEFAULT_BLOCK_ROWS) -> Path:
    """Write training-layout records (dicts with the ``COLUMNS`` keys; missing ones become "")
    as ``.parquet`` (row groups of ``row_group_rows``, written as they come) or ``.jsonl``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def complete(rec: dict[str, Any]) -> dict[str, Any]:
        unknown = set(rec) - set(COLUMNS)
        if unknown:
            raise TrainDataError(f"{path}: unknown column(s) {', '.join(sorted(unknown))}; use {', '.join(COLUMNS)}")
        return {c: "" if rec.get(c) is None else rec[c] for c in COLUMNS}

    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(complete(rec), ensure_ascii=False) + "\n")
        return path
    if path.suffix != ".parquet":
        raise TrainDataError(f"{path}: write training data as .parquet or .jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.string()) for c in COLUMNS])
    with pq.ParquetWriter(path, schema) as writer:
        chunk: list[dict[str, Any]] = []
        for rec in records:
            chunk.append(complete(rec))
            if len(chunk) == row_group_rows:
                writer.write_table(pa.Table.from_pylist(chunk, schema), row_group_size=row_group_rows)
                chunk = []
        if chunk:
            writer.write_table(pa.Table.from_pylist(chunk, schema), row_group_size=row_group_rows)
    return path
