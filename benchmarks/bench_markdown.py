"""Render saved `magic-mm bench --save` JSON files as the README's Markdown tables.

    .venv/bin/python benchmarks/bench_markdown.py benchmarks/results/bench-*.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def fmt_ms(stats: dict[str, float] | None) -> str:
    return "—" if not stats else f"{stats['median']:.0f} / {stats['p95']:.0f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def table(title: str, res: dict[str, Any]) -> str:
    rows = res["variants"]
    quality = any("quality" in r for r in rows.values())
    head = ["variant", "visual tokens", "LM seq query / cand", "query ms p50 / p95", "cand ms p50 / p95",
            f"cands/s @ batch {res['batch']}" if res["batch"] else "cands/s (not run)", "peak RSS MiB", "tokens ×", "cand ms ×", "throughput ×", "memory ×"]
    head += ["t2i hit@1 %"] if quality else []
    lines = [f"**{title}** ({res['reps']} interleaved reps × {res['items_per_rep']} inputs; ratios vs `{res['baseline']}`)",
             "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, r in rows.items():
        if r.get("skipped"):
            lines.append(f"| `{name}` | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        thr = r.get("throughput_per_s")
        mem = (r.get("memory") or {}).get("peak_mib")
        cells = [f"`{name}`", str(r["visual_tokens"]), f"{r['query_seq_len']} / {r['candidate_seq_len']}",
                 fmt_ms(r["query_ms"]), fmt_ms(r["candidate_ms"]), "—" if not thr else f"{thr['median']:.2f}",
                 "—" if mem is None else f"{mem:.0f}", fmt_ratio(r["ratios"]["visual_tokens"]),
                 fmt_ratio(r["ratios"]["candidate_ms"]), fmt_ratio(r["ratios"]["throughput"]),
                 fmt_ratio(r["ratios"]["peak_memory"])]
        if quality:
            cells.append(f"{100 * r['quality']['score']:.1f}" if "quality" in r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> None:
    for path in paths:
        result = json.loads(open(path).read())
        m = result["machine"]
        print(f"<!-- {path}: {m['device']}, {m['cpus']} cores, torch threads {m['torch_threads']}, "
              f"load average at start {m.get('load_average_at_start')} -->\n")
        if result.get("model"):
            print(table(result["model"]["target"]["model"], result["model"]))
        for arch, res in result.get("architectures", {}).items():
            print(table(f"{arch}, random init", res))


if __name__ == "__main__":
    main(sys.argv[1:])
