"""The tasks YAML: which tasks to run, where their data is, how to score them.

```yaml
defaults:            # optional; any task key below
  mode: local        # local: rank each query's own candidates; global: the de-duplicated pool
tasks:
  - name: MSCOCO_t2i                 # an MMEB file (parquet or JSONL)
    file: MMEB-eval/MSCOCO_t2i/test-00000-of-00001.parquet
    image_root: MMEB-eval/eval_images
  - name: flickr8k-t2i               # built on the fly from an image–caption folder
    captions: ../shared/data/flickr8k-1k
    split: test
    direction: t2i                   # or i2t
    candidates: null                 # per query; null = the whole split
  - name: my-labels                  # built from an image–label CSV
    labels: data/labels.csv
    image_root: data/images
```

Other task keys: ``meta`` (classification, vqa, retrieval, grounding; MMEB task
names know theirs), ``distribution`` (ind / ood), ``primary`` (the metric the
averages use: ``hit@1`` by default, e.g. ``ndcg@5`` for document retrieval),
``query_instruction`` / ``candidate_instruction`` (override the file's),
``limit`` (first N queries only).  Relative paths are relative to the YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from magic_mm.data.mmeb import Item, TaskRow, parse_records, read_task
from magic_mm.errors import UserError

MODES = ("local", "global")
META_TASKS = ("classification", "vqa", "retrieval", "grounding")

# MMEB's 36 tasks: meta-task and whether they are in-distribution (IND) or not (OOD),
# as VLM2Vec groups them.
_MMEB = {
    "classification": ("ImageNet-1K N24News HatefulMemes VOC2007 SUN397",
                       "Place365 ImageNet-A ImageNet-R ObjectNet Country211"),
    "vqa": ("OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W",
            "ScienceQA VizWiz GQA TextVQA"),
    "retrieval": ("VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA",
                  "FashionIQ Wiki-SS-NQ OVEN EDIS"),
    "grounding": ("MSCOCO", "RefCOCO RefCOCO-Matching Visual7W-Pointing"),
}
MMEB_TASKS: dict[str, tuple[str, str]] = {
    name: (meta, dist)
    for meta, (ind, ood) in _MMEB.items()
    for dist, names in (("ind", ind), ("ood", ood))
    for name in names.split()
}

_KNOWN_KEYS = {"name", "file", "image_root", "captions", "split", "direction", "candidates", "seed", "labels",
               "meta", "distribution", "primary", "mode", "query_instruction", "candidate_instruction", "limit"}


class TasksFileError(UserError):
    """A tasks YAML that cannot be used."""


@dataclass
class TaskSpec:
    name: str
    source: str  # "file", "captions" or "labels"
    path: Path
    image_root: Path | None = None
    split: str | None = None
    direction: str = "t2i"
    candidates: int | None = None
    seed: int = 0
    meta: str = "other"
    distribution: str | None = None
    primary: str = "hit@1"
    mode: str = "local"
    query_instruction: str | None = None
    candidate_instruction: str | None = None
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def load(self) -> list[TaskRow]:
        """The task's rows, converting on the fly for ``captions`` / ``labels`` sources."""
        if self.source == "file":
            rows = read_task(self.path, self.image_root)
        else:
            from magic_mm.data.convert import caption_task, label_task

            converted = (caption_task(self.path, self.split, self.direction, self.candidates, self.seed)  # type: ignore[arg-type]
                         if self.source == "captions" else label_task(self.path, self.image_root))
            rows = parse_records(converted.records, self.path, converted.image_root)
        if self.limit is not None:
            rows = rows[: self.limit]
        if self.query_instruction is not None or self.candidate_instruction is not None:
            rows = [self._override(r) for r in rows]
        return rows

    def _override(self, row: TaskRow) -> TaskRow:
        def inst(item: Item, value: str | None) -> Item:
            return item if value is None else replace(item, instruction=value)

        return TaskRow(inst(row.query, self.query_instruction),
                       [inst(c, self.candidate_instruction) for c in row.candidates], row.grades)


def load_tasks(path: str | Path, only: list[str] | None = None, mode: str | None = None) -> list[TaskSpec]:
    """Parse a tasks YAML; ``only`` keeps the named tasks, ``mode`` overrides every task's mode."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TasksFileError(f"{path}: tasks file not found; pass --tasks with a YAML file (see tasks.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TasksFileError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise TasksFileError(f"{path}: needs a non-empty 'tasks:' list")
    defaults = data.get("defaults") or {}
    specs = [_spec({**defaults, **entry} if isinstance(entry, dict) else entry, path, n)
             for n, entry in enumerate(data["tasks"])]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TasksFileError(f"{path}: task name(s) {', '.join(dupes)} appear more than once; names must be unique")
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise TasksFileError(f"{path}: no task named {', '.join(unknown)}; known: {', '.join(names)}")
        specs = [s for s in specs if s.name in only]
    if mode is not None:
        if mode not in MODES:
            raise TasksFileError(f"--mode {mode!r}: use local or global")
        for s in specs:
            s.mode = mode
    return specs


def _spec(entry: Any, path: Path, number: int) -> TaskSpec:
    where = f"{path}, task {number + 1}"
    if not isinstance(entry, dict) or not entry.get("name"):
        raise TasksFileError(f"{where}: each task needs at least 'name' and one of file / captions / labels")
    where = f"{path}, task {entry['name']!r}"
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        raise TasksFileError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN_KEYS))}")
    sources = [k for k in ("file", "captions", "labels") if entry.get(k)]
    if len(sources) != 1:
        raise TasksFileError(f"{where}: give exactly one of 'file', 'captions' or 'labels'")
    base = path.parent

    def rel(value: Any) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else base / p

    name = str(entry["name"])
    meta, dist = MMEB_TASKS.get(name, (None, None))
    spec = TaskSpec(
        name=name, source=sources[0], path=rel(entry[sources[0]]),
        image_root=rel(entry["image_root"]) if entry.get("image_root") else None,
        split=entry.get("split"), direction=str(entry.get("direction", "t2i")),
        candidates=entry.get("candidates"), seed=int(entry.get("seed", 0)),
        meta=str(entry.get("meta") or meta or ("classification" if sources[0] == "labels" else
                                                "retrieval" if sources[0] == "captions" else "other")),
        distribution=entry.get("distribution", dist), primary=str(entry.get("primary", "hit@1")),
        mode=str(entry.get("mode", "local")), query_instruction=entry.get("query_instruction"),
        candidate_instruction=entry.get("candidate_instruction"), limit=entry.get("limit"),
    )
    if spec.mode not in MODES:
        raise TasksFileError(f"{where}: mode {spec.mode!r}; use local or global")
    if spec.candidates is not None and (not isinstance(spec.candidates, int) or spec.candidates < 2):
        raise TasksFileError(f"{where}: candidates must be an integer >= 2 or null (the whole split)")
    if spec.limit is not None and (not isinstance(spec.limit, int) or spec.limit < 1):
        raise TasksFileError(f"{where}: limit must be a positive integer")
    return spec
