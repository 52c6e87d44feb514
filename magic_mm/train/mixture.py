"""The training data of a run: the config's sub-datasets, opened for streaming, and their pools.

Every trainer reads its data through ``TrainData``: ``datasets:`` in the config is a
mixture; the older ``data: {folder: …}`` is read as a mixture of one caption folder (plus,
in stage 1, a text sub-dataset made of ``stage1.text_instructions``).  See
``magic_mm/data/train_layout.py`` for the layout, streaming and order.

A sub-dataset's *pool* is what stage 2's mining and stage 3's retrieval rank a query
against: the distinct positives of that sub-dataset only.  A query's *group* is its own
positive, so the same positive shared by several queries (the captions of one image) is
never a negative of any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magic_mm.data.captions import read_captioned_images
from magic_mm.data.mmeb import Item
from magic_mm.data.train_layout import (
    MixtureSampler,
    SubDataset,
    SubDatasetReader,
    TrainRow,
    fixed_blocks,
    open_subdataset,
)
from magic_mm.train.config import TrainConfig


@dataclass
class Pool:
    """One sub-dataset's queries and candidate pool (its distinct positives)."""

    source: int  # index of the sub-dataset
    rows: list[int]  # file row of each query
    queries: list[Item]
    owner: list[int]  # candidate index of each query's positive (also its group)
    candidates: list[Item]
    index: dict[Item, int] = field(default_factory=dict)  # candidate → its index


def item_to_json(item: Item) -> dict[str, str | None]:
    return {"text": item.text, "image": None if item.image is None else str(item.image)}


def item_from_json(data: dict[str, Any]) -> Item:
    return Item(None, data.get("text"), Path(data["image"]) if data.get("image") else None)


class TrainData:
    """The run's sub-datasets (readers), their instructions and the batch order."""

    def __init__(self, config: TrainConfig, specs: list[SubDataset], readers: list[SubDatasetReader]) -> None:
        self.config = config
        self.specs = specs
        self.readers = readers
        self.names = [r.name for r in readers]
        self._samplers: dict[Any, MixtureSampler] = {}

    @classmethod
    def from_config(cls, config: TrainConfig) -> TrainData:
        block_rows = config.data.block_rows
        if config.datasets:
            specs = list(config.datasets)
            return cls(config, specs, [open_subdataset(spec, block_rows) for spec in specs])
        specs, records = legacy_specs(config)
        readers = [open_subdataset(spec, block_rows) if rows is None  # rows: text instructions given inline
                   else SubDatasetReader(spec, block_rows, records=rows) for spec, rows in zip(specs, records)]
        return cls(config, specs, readers)

    # -- instructions and prompts ---------------------------------------------------------
    def instructions(self, d: int) -> tuple[str | None, str | None]:
        """(query, candidate) instructions of sub-dataset ``d``: its own, else the config's
        ``stage3.instructions`` entry under its name, else None (the model's defaults)."""
        spec = self.specs[d]
        table = self.config.stage3.instructions.get(self.names[d], {})
        q = spec.query_instruction if spec.query_instruction is not None else table.get("query")
        c = spec.candidate_instruction if spec.candidate_instruction is not None else table.get("candidate")
        return q, c

    def judge_question(self, d: int) -> str:
        return self.specs[d].judge_question or self.config.stage3.judge.question

    # -- batches --------------------------------------------------------------------------
    def sampler(self, stream: int = 0, rows: list[list[int]] | None = None) -> MixtureSampler:
        """The sampler of a stream: over every row, or (``rows``) over the listed rows of each
        sub-dataset (stage 2's hard-negative phase: the mined queries)."""
        key = (stream, None if rows is None else tuple(len(r) for r in rows))
        if key not in self._samplers:
            block_rows = self.config.data.block_rows
            blocks = [r.blocks for r in self.readers] if rows is None else [fixed_blocks(len(r), block_rows) for r in rows]
            self._samplers[key] = MixtureSampler(blocks, [s.weight for s in self.specs], self.config.batch_size,
                                                 self.config.seed, stream)
        return self._samplers[key]

    def batch(self, step: int, stream: int = 0, rows: list[list[int]] | None = None) -> tuple[int, list[TrainRow]]:
        """(sub-dataset, its rows) of step ``step``: a pure function of the seed and the step."""
        d, positions = self.sampler(stream, rows).batch(step)
        wanted = positions if rows is None else [rows[d][p] for p in positions]
        return d, self.readers[d].rows(wanted)

    # -- whole passes (pools, vision cache) -------------------------------------------------
    def pool(self, d: int, per_group: int | None = None) -> Pool:
        """Sub-dataset ``d``'s queries (at most ``per_group`` per positive) and candidate pool."""
        pool = Pool(d, [], [], [], [])
        seen: dict[int, int] = {}
        for row in self.readers[d]:
            c = pool.index.get(row.positive)
            if c is None:
                c = pool.index[row.positive] = len(pool.candidates)
                pool.candidates.append(row.positive)
            if per_group is None or seen.get(c, 0) < per_group:
                seen[c] = seen.get(c, 0) + 1
                pool.rows.append(row.index)
                pool.queries.append(row.query)
                pool.owner.append(c)
        return pool

    def image_paths(self) -> list[Path]:
        """Every image the sub-datasets name, once (one streamed pass over each)."""
        paths: dict[Path, None] = {}
        for reader in self.readers:
            for row in reader:
                for item in (row.query, row.positive, *row.negatives):
                    if item.image is not None:
                        paths[item.image] = None
        return list(paths)


def legacy_specs(config: TrainConfig) -> tuple[list[SubDataset], list[list[dict[str, Any]] | None]]:
    """``data: {folder, split, limit_images}`` as a mixture of one caption sub-dataset (named after the
    folder; instructions from ``stage3.instructions[stage3.task]`` when there), plus stage 1's ``text_instructions`` as a text sub-dataset weighted by
    its size, so every example is as likely as before."""
    data = config.data
    limit = None
    if data.limit_images is not None:
        items = read_captioned_images(data.folder, data.split)[: data.limit_images]
        limit = sum(len(i.captions) for i in items)
    table = config.stage3.instructions.get(config.stage3.task, {})  # the older per-task instruction table
    captions = SubDataset(file=data.folder, split=data.split, limit=limit, format="captions", kind="caption",
                          prompt=config.stage1.caption_prompt, query_instruction=table.get("query"),
                          candidate_instruction=table.get("candidate"))
    texts = config.stage1.text_instructions if config.stage == "stage1" else []
    if not texts:
        return [captions], [None]
    n_captions = sum(len(i.captions) for i in read_captioned_images(data.folder, data.split)[: data.limit_images])
    captions.weight = float(n_captions)
    text = SubDataset(file="stage1.text_instructions", name="text-instructions", weight=float(len(texts)),
                      kind="text", prompt="{text}")
    rows = [{"qry": t["prompt"], "qry_image_path": "", "pos_text": t["answer"], "pos_image_path": ""} for t in texts]
    return [captions, text], [None, rows]
