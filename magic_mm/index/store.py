"""The page table: one LanceDB row per indexed page, stamped with the model that embedded it.

Rows: ``path`` (resolved file), ``kind`` (image/pdf), ``page`` (1-based), ``pages`` (the
document's page count), ``hash`` (sha256 of the file), ``vector`` (L2-normalised
candidate embedding).  The table's schema metadata holds a ``ModelStamp``; vectors from
another model (or compression, or instruction) live in another space, so mixing them is
refused.

Crash safety comes from LanceDB itself: every ``add`` and ``delete`` is one atomic commit.
A document is written as "delete its rows, then add all its pages", so a kill between
the two leaves the document absent (and the next run adds it), and a kill before the
``add`` commits leaves nothing behind.  ``DocumentState.is_current`` is the check that
makes the next run skip only complete, up-to-date documents.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from magic_mm.errors import UserError
from magic_mm.model.dtypes import dtype_name
from magic_mm.model.embedder import MagicEmbedder

TABLE = "pages"
STAMP_KEY = b"magic_mm"
# Past this many rows exact search gets slow enough that an ANN index pays off.
ANN_ADVICE_ROWS = 100_000
ANN_KINDS = ("ivf-pq", "hnsw")


class IndexDbError(UserError):
    """A missing, foreign or mismatched index database."""


@dataclass(frozen=True)
class ModelStamp:
    """What produced a table's vectors; two stamps match when their vectors are comparable."""

    model: str  # as the user named it: "magic-mm-tiny", a folder, "tiny-random-composed"
    compression: str
    dim: int
    fingerprint: str  # hash of the architecture spec, instructions and trained weights
    # The dtype the vectors were computed in.  Not part of ``matches``: float32 and bfloat16
    # vectors of one model agree to a mean cosine above 0.998 and retrieve alike, so an index
    # built in one is searched (and extended) in the other, with a note (docs/speed.md).
    # Stamps written before dtypes existed lack it; those indexes were built in float32.
    dtype: str = "float32"

    @classmethod
    def of(cls, embedder: MagicEmbedder, model: str) -> ModelStamp:
        config = embedder.config
        digest = hashlib.sha256(json.dumps(
            {"family": config.family, "backbone": config.backbone, "compression": str(embedder.compression),
             "instructions": config.instructions}, sort_keys=True).encode())
        # The weights as saved (float32), whatever dtype the model runs in.
        state = embedder.source_state if embedder.source_state is not None else embedder.trained_state_dict()
        for name, tensor in sorted(state.items()):
            digest.update(name.encode())
            digest.update(tensor.float().cpu().numpy().tobytes())
        return cls(model=model, compression=str(embedder.compression), dim=embedder.embedding_dim,
                   fingerprint=digest.hexdigest()[:16], dtype=dtype_name(embedder.backbone.dtype))

    def matches(self, other: ModelStamp) -> bool:
        return (self.fingerprint, self.compression, self.dim) == (other.fingerprint, other.compression, other.dim)

    def dtype_note(self, other: ModelStamp) -> str | None:
        """A one-line note when ``other`` (the model in use) runs in another dtype than the index."""
        if self.dtype == other.dtype:
            return None
        return (f"note: the index was built in {self.dtype} and the model now runs in {other.dtype}; the vectors "
                f"agree closely (mean cosine > 0.998), so results are comparable. Pass --dtype {self.dtype} to match "
                "exactly")


@dataclass
class DocumentState:
    """The rows a document has in the table (any number, possibly inconsistent after a crash)."""

    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (hash, page, pages)

    def is_current(self, file_hash: str) -> bool:
        """True when the rows are exactly pages 1..N of this content, each once."""
        if not self.rows or any(h != file_hash for h, _, _ in self.rows):
            return False
        total = self.rows[0][2]
        return sorted(p for _, p, _ in self.rows) == list(range(1, total + 1)) and all(
            n == total for _, _, n in self.rows)


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    page: int
    pages: int
    kind: str
    embedding_score: float
    rerank_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _schema(dim: int, stamp: ModelStamp) -> pa.Schema:
    return pa.schema([
        pa.field("path", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("page", pa.int32()),
        pa.field("pages", pa.int32()),
        pa.field("hash", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), dim)),
    ], metadata={STAMP_KEY: json.dumps(asdict(stamp)).encode()})


def db_location(db: str | Path) -> str | Path:
    """``--db`` as LanceDB takes it: an object-store URI (``s3://bucket/magic.lance``, ``gs://…``,
    ``az://…``) stays a string; anything else is a local folder."""
    text = str(db)
    return text if "://" in text else Path(db)


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PageStore:
    """The ``pages`` table of one LanceDB database (``--db``: a folder, or an object-store URI)."""

    def __init__(self, db_path: str | Path, table: Any) -> None:
        self.db_path = db_path
        self.table = table

    @classmethod
    def open(cls, db_path: str | Path) -> PageStore:
        """Open an existing index, or raise a ``UserError`` saying how to make one."""
        import lancedb

        path = db_location(db_path)
        if isinstance(path, Path) and not path.is_dir():
            raise IndexDbError(f"--db {db_path}: no index there; build one with `magic-mm index PATH… --db {db_path}`")
        db = lancedb.connect(str(path))
        if TABLE not in db.list_tables().tables:
            raise IndexDbError(f"--db {db_path}: holds no magic-mm page table; build one with `magic-mm index`")
        store = cls(path, db.open_table(TABLE))
        store.stamp  # fail early on a foreign table
        return store

    @classmethod
    def open_or_create(cls, db_path: str | Path, stamp: ModelStamp, rebuild: bool = False) -> PageStore:
        """Open the index at ``db_path`` (checking it was built by this model) or create it.

        ``rebuild`` drops the existing table first (for a new model, or changed weights).
        """
        import lancedb

        path = db_location(db_path)
        if isinstance(path, Path) and path.exists() and not path.is_dir():
            raise IndexDbError(f"--db {db_path}: is a file; pass a folder name such as ./magic.lance")
        db = lancedb.connect(str(path))
        if rebuild and TABLE in db.list_tables().tables:
            db.drop_table(TABLE)
        if TABLE in db.list_tables().tables:
            store = cls(path, db.open_table(TABLE))
            store.check_model(stamp, action="add to it")
            return store
        return cls(path, db.create_table(TABLE, schema=_schema(stamp.dim, stamp)))

    @property
    def stamp(self) -> ModelStamp:
        raw = (self.table.schema.metadata or {}).get(STAMP_KEY)
        if raw is None:
            raise IndexDbError(f"--db {self.db_path}: its table has no magic-mm model stamp; it was not made by "
                              "`magic-mm index`")
        return ModelStamp(**json.loads(raw))

    def check_model(self, stamp: ModelStamp, action: str = "search it") -> str | None:
        """Raise if ``stamp``'s vectors are not comparable with the index's; return a note
        (or ``None``) when they are comparable but computed in another dtype."""
        built = self.stamp
        if not built.matches(stamp) and built.model == stamp.model:
            raise IndexDbError(
                f"--db {self.db_path} was built with an earlier version of {built.model!r} (fingerprint "
                f"{built.fingerprint}, now {stamp.fingerprint}: its weights or settings changed); its vectors are "
                "out of date. Re-embed everything with `magic-mm index … --rebuild`, or index into a new --db"
            )
        if not built.matches(stamp):
            raise IndexDbError(
                f"--db {self.db_path} was built with model {built.model!r} (compression {built.compression}, "
                f"dim {built.dim}, fingerprint {built.fingerprint}) but you are using {stamp.model!r} "
                f"(compression {stamp.compression}, dim {stamp.dim}, fingerprint {stamp.fingerprint}); vectors of "
                f"different models are not comparable. Pass --model {built.model} to {action}, or index into a "
                "new --db"
            )
        return built.dtype_note(stamp)

    def count(self) -> int:
        return self.table.count_rows()

    def documents(self) -> dict[str, DocumentState]:
        """Every document's rows, read without the vectors."""
        columns = self.table.search().select(["path", "hash", "page", "pages"]).limit(None).to_arrow()
        states: dict[str, DocumentState] = defaultdict(DocumentState)
        for path, file_hash, page, pages in zip(*(columns[c].to_pylist() for c in ("path", "hash", "page", "pages"))):
            states[path].rows.append((file_hash, page, pages))
        return dict(states)

    def delete_paths(self, paths: list[str]) -> None:
        # Chunked so the SQL filter stays a reasonable size.
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            self.table.delete(f"path IN ({', '.join(_sql_str(p) for p in chunk)})")

    def replace(self, paths: list[str], rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        """Make ``rows`` (with ``vectors``) the only rows of ``paths``: delete, then one atomic add."""
        self.delete_paths(paths)
        if not rows:
            return
        dim = self.stamp.dim
        columns = {name: [r[name] for r in rows] for name in ("path", "kind", "page", "pages", "hash")}
        columns["vector"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)), dim)
        self.table.add(pa.table(columns, schema=self.table.schema))

    def search(self, vector: np.ndarray, k: int, exact: bool = False, nprobes: int | None = None) -> list[Hit]:
        """The ``k`` nearest pages by cosine similarity (exact unless an ANN index exists)."""
        query = self.table.search(np.asarray(vector, dtype=np.float32)).distance_type("cosine").limit(k)
        query = query.select(["path", "kind", "page", "pages", "_distance"])
        if exact:
            query = query.bypass_vector_index()
        elif nprobes is not None:
            query = query.nprobes(nprobes)
        hits = []
        for rank, row in enumerate(query.to_arrow().to_pylist(), 1):
            score = 1.0 - float(row["_distance"])
            hits.append(Hit(rank=rank, score=score, path=row["path"], page=row["page"], pages=row["pages"],
                            kind=row["kind"], embedding_score=score))
        return hits

    def build_ann(self, kind: str) -> None:
        """Build an approximate index (IVF-PQ or HNSW) over the vectors; searches then use it."""
        if kind not in ANN_KINDS:
            raise UserError(f"--ann {kind!r}: choose one of {', '.join(ANN_KINDS)}")
        rows = self.count()
        if rows < 256:
            raise UserError(f"--ann: the index has {rows} rows; an ANN index needs at least 256 (exact search is "
                            "fast at this size)")
        build_ann_index(self.table, kind, rows, self.stamp.dim)

    def optimize(self) -> None:
        """Merge the small fragments that incremental commits leave behind."""
        self.table.optimize()


def build_ann_index(table: Any, kind: str, rows: int, dim: int) -> None:
    """One place for the ANN parameters (also used by benchmarks/ann.py).

    About sqrt(rows) IVF partitions, but at least 256 rows each (k-means needs them);
    PQ with 8-dim sub-vectors (dim must divide).
    """
    partitions = max(1, min(4096, int(np.sqrt(rows)), rows // 256))
    sub_vectors = next(s for s in (dim // 8, dim // 4, dim // 2, 1) if s >= 1 and dim % s == 0)
    index_type = "IVF_PQ" if kind == "ivf-pq" else "IVF_HNSW_SQ"
    options: dict[str, Any] = {"metric": "cosine", "index_type": index_type, "num_partitions": partitions,
                               "vector_column_name": "vector", "replace": True}
    if index_type == "IVF_PQ":
        options["num_sub_vectors"] = sub_vectors
    else:
        # HNSW inside few coarse partitions: the graph does the searching.
        options["num_partitions"] = max(1, rows // 200_000)
    table.create_index(**options)
