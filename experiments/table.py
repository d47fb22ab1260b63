"""Turn the metrics.json rows of a comparison into tables (markdown) and a PPL-vs-bits plot.

    python experiments/table.py experiments/results/wt2_small [--plot out.png]

Reads <dir>/teacher/metrics.json and every metrics.json of a stage=quantize run below <dir>;
prints the main table (like Table 1 of the paper: size, compression, PPL, PPL ratio to the
teacher, per method and bit-width) and the ablation table, and writes <dir>/table.md and
<dir>/ppl_vs_bits.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MAIN_METHODS = ("quantgpt", "pact", "lsq", "laq", "twn", "minmax")


def load_rows(root: Path) -> tuple[dict, list[dict]]:
    teacher = json.loads((root / "teacher" / "metrics.json").read_text())
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        m = json.loads(path.read_text())
        if m["config"]["stage"] != "quantize" or "student" not in m:
            continue
        m["_path"] = str(path.parent)
        rows.append(m)
    return teacher, rows


def label(m: dict) -> str:
    c = m["config"]
    neg = c.get("negatives", "teacher")
    return c["method"] if neg == "teacher" else f"{c['method']} (negatives={neg})"


def weight_bits(m: dict) -> int:
    tag = m["config"]["bits"]  # W2E2A8
    return int(tag[1 : tag.index("E")])


def main_table(teacher: dict, rows: list[dict]) -> str:
    t_ppl = teacher["teacher"]["test_ppl"]
    fp_mib = rows[0]["size"]["fp32_mib"] if rows else float("nan")
    out = ["| method | bits (W-E-A) | size (MiB) | compression | test PPL | PPL / teacher | QAT time (s) |",
           "|---|---|---|---|---|---|---|",
           f"| teacher (FP32) | 32-32-32 | {fp_mib:.2f} | 1.0x | {t_ppl:.2f} | 1.000 | - |"]
    main = [m for m in rows if m["config"]["method"] in MAIN_METHODS and m["config"].get("negatives", "teacher") == "teacher"]
    for m in sorted(main, key=lambda m: (-weight_bits(m), m["student"]["test_ppl"])):
        out.append(_row(m, t_ppl))
    return "\n".join(out)


def ablation_table(teacher: dict, rows: list[dict]) -> str:
    t_ppl = teacher["teacher"]["test_ppl"]
    abl = [m for m in rows if weight_bits(m) == 2 and (m["config"]["method"] not in MAIN_METHODS
                                                        or m["config"].get("negatives", "teacher") != "teacher"
                                                        or m["config"]["method"] == "quantgpt")]
    out = ["| variant (W2E2A8) | bits (W-E-A) | size (MiB) | compression | test PPL | PPL / teacher | QAT time (s) |",
           "|---|---|---|---|---|---|---|"]
    for m in sorted(abl, key=lambda m: m["student"]["test_ppl"]):
        out.append(_row(m, t_ppl))
    return "\n".join(out)


def _row(m: dict, t_ppl: float) -> str:
    tag = m["config"]["bits"][1:].replace("E", "-").replace("A", "-")
    s, p = m["size"], m["student"]["test_ppl"]
    return (f"| {label(m)} | {tag} | {s['quantized_mib']:.2f} | {s['compression']:.1f}x | {p:.2f} | "
            f"{p / t_ppl:.3f} | {m['wall_time_s'].get('student', float('nan')):.0f} |")


def plot(teacher: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[tuple[int, float]]] = {}
    for m in rows:
        if m["config"].get("negatives", "teacher") == "teacher":
            by_method.setdefault(m["config"]["method"], []).append((weight_bits(m), m["student"]["test_ppl"]))
    for name, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [p for _, p in pts], marker="o", label=name)
    ax.axhline(teacher["teacher"]["test_ppl"], color="k", ls="--", label="teacher (FP32)")
    ax.set_xlabel("weight / embedding bits")
    ax.set_ylabel("test perplexity")
    ax.set_yscale("log")
    ax.set_xticks(sorted({weight_bits(m) for m in rows}))
    ax.legend(fontsize=7)
    ax.set_title(f"{teacher['config']['model']} on {teacher['config']['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    args = ap.parse_args()
    teacher, rows = load_rows(args.root)
    text = (f"## Methods\n\n{main_table(teacher, rows)}\n\n## Ablations\n\n{ablation_table(teacher, rows)}\n")
    print(text)
    (args.root / "table.md").write_text(text)
    if rows:
        plot(teacher, rows, args.root / "ppl_vs_bits.png")
        print(f"wrote {args.root / 'table.md'} and {args.root / 'ppl_vs_bits.png'}")


if __name__ == "__main__":
    main()
