"""Turn the metrics.json rows of comparisons into tables (markdown) and a PPL-vs-bits plot.

    python experiments/table.py experiments/results/wt2_small [experiments/results/ptb_small ...] [--out DIR]

Each directory is one task's comparison (as written by compare.py): <dir>/teacher/metrics.json
and every metrics.json of a stage=quantize run below <dir>. Prints the main table (like Table 1
of the paper: size, compression, then test PPL and PPL / teacher per task, per method and
bit-width), the ablation table (every other QAT variant, named by the `method.*` overrides Hydra
recorded, e.g. "lsq (activation_granularity=token)"; the plot draws each as its own line), and
writes table.md and ppl_vs_bits.png into --out (default: the first directory). Runs of the same
method, bit-width and task with different seeds are aggregated: the cell shows the mean, with
"± std (n seeds)" when there is more than one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

MAIN_METHODS = ("quantgpt", "quantgpt_full_grid", "pact", "lsq", "laq", "twn", "minmax")
REFERENCES = ("quantgpt", "quantgpt_full_grid")  # main-table rows repeated in the ablation table


@dataclass
class Task:
    """One comparison directory: its teacher and its quantized runs."""

    name: str
    teacher: dict
    rows: list[dict] = field(default_factory=list)

    @property
    def teacher_ppl(self) -> float:
        return self.teacher["teacher"]["test_ppl"]


def load_run(path: Path) -> dict:
    """A run's metrics.json, plus `variant_overrides`: the command-line overrides Hydra recorded for it
    (<run>/.hydra/overrides.yaml) that make it a variant, each without its first key component: the
    `method.*` ones (how the run differs from its method's config, e.g. {"distill.negatives": "random"}),
    the student's optimizer (`student.optim.scale_lr` as "optim.scale_lr") and `trainer.precision` (as
    "precision"): a run at another learning rate or under bf16 is its own row, never a seed of the default."""
    m = json.loads(path.read_text())
    overrides = path.parent / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        pairs = (o.lstrip("+~").split("=", 1) for o in OmegaConf.to_container(OmegaConf.load(overrides)) or [])
        m["variant_overrides"] = {k.split(".", 1)[1]: v for k, v in (p for p in pairs if len(p) == 2)
                                  if k.startswith(("method.", "student.optim.")) or k == "trainer.precision"}
    return m


def load_task(root: Path) -> Task:
    teacher = json.loads((root / "teacher" / "metrics.json").read_text())
    task = Task(teacher["config"]["task"], teacher)
    for path in sorted(root.rglob("metrics.json")):
        m = load_run(path)
        if m["config"]["stage"] == "quantize" and "student" in m:
            task.rows.append(m)
    return task


def label(m: dict) -> str:
    """The method, with what the run changed of it: "quantgpt (negatives=random)"."""
    c = m["config"]
    if "variant_overrides" in m:
        changed = {k.removeprefix("distill."): v for k, v in m["variant_overrides"].items()}
    else:  # metrics.json without Hydra's record: the one variant metrics.json itself names
        neg = c.get("negatives", "teacher")
        changed = {} if neg == "teacher" else {"negatives": neg}
    return c["method"] + (f" ({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})" if changed else "")


def weight_bits(m: dict) -> int:
    tag = m["config"]["bits"]  # W2E2A8
    return int(tag[1 : tag.index("E")])


def is_ptq(m: dict) -> bool:
    """Post-training quantization: a student stage of no steps (the quantizer's initial scales)."""
    return m["config"].get("student_steps") == 0


def is_main(m: dict) -> bool:
    return m["config"]["method"] in MAIN_METHODS and label(m) == m["config"]["method"] and not is_ptq(m)


def is_ablation(m: dict) -> bool:
    """Every QAT variant that is not a main row (at any bit-width: a W4 run with per-token activations is
    one), with the reference methods repeated to compare against."""
    return not is_ptq(m) and (not is_main(m) or m["config"]["method"] in REFERENCES)


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(label, bits tag) -> the runs of that variant (one per seed)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for m in rows:
        out.setdefault((label(m), m["config"]["bits"]), []).append(m)
    return out


def _ppls(runs: list[dict]) -> list[float]:
    return [m["student"]["test_ppl"] for m in runs]


def _cell(ppls: list[float]) -> str:
    if not ppls:
        return "-"
    mean = statistics.fmean(ppls)
    return f"{mean:.2f}" if len(ppls) == 1 else f"{mean:.2f} ± {statistics.stdev(ppls):.2f} ({len(ppls)} seeds)"


def table(tasks: list[Task], keep, title: str) -> str:
    """One row per (variant, bits) present in any task; PPL and ratio columns per task."""
    groups = [_groups([m for m in t.rows if keep(m)]) for t in tasks]
    def order(key: tuple[str, str]) -> tuple[int, float]:  # higher bits first, then the first task's PPL
        runs = next(g[key] for g in groups if key in g)
        return -weight_bits(runs[0]), statistics.fmean(_ppls(runs))

    keys = sorted({k for g in groups for k in g}, key=order)
    head = [title, "bits (W-E-A)", "size (MiB)", "compression"]
    for t in tasks:
        head += [f"{t.name} PPL", f"{t.name} PPL / teacher"]
    head.append("QAT time (s)")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next((r for t in tasks for r in t.rows), None)
    if first is not None and title == "method":
        cells = ["teacher (FP32)", "32-32-32", f"{first['size']['fp32_mib']:.2f}", "1.0x"]
        for t in tasks:
            cells += [f"{t.teacher_ppl:.2f}", "1.000"]
        out.append("| " + " | ".join(cells + ["-"]) + " |")
    for key in keys:
        runs = [g.get(key, []) for g in groups]
        any_run = next(r[0] for r in runs if r)
        size = any_run["size"]
        cells = [key[0], key[1][1:].replace("E", "-").replace("A", "-"), f"{size['quantized_mib']:.2f}",
                 f"{size['compression']:.1f}x"]
        for t, r in zip(tasks, runs, strict=True):
            p = _ppls(r)
            cells += [_cell(p), f"{statistics.fmean(p) / t.teacher_ppl:.3f}" if p else "-"]
        times = [m["wall_time_s"].get("student", float("nan")) for r in runs for m in r]
        cells.append(f"{statistics.fmean(times):.0f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(tasks: list[Task], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        by_method: dict[str, dict[int, list[float]]] = {}
        for m in t.rows:
            if m["config"].get("negatives", "teacher") == "teacher" and not is_ptq(m):
                by_method.setdefault(label(m), {}).setdefault(weight_bits(m), []).append(
                    m["student"]["test_ppl"])
        for name, pts in sorted(by_method.items()):
            bits = sorted(pts)
            ax.plot(bits, [statistics.fmean(pts[b]) for b in bits], marker="o", label=name)
        ax.axhline(t.teacher_ppl, color="k", ls="--", label="teacher (FP32)")
        ax.set_xlabel("weight / embedding bits")
        ax.set_ylabel("test perplexity")
        ax.set_yscale("log")
        ax.set_xticks(sorted({weight_bits(m) for m in t.rows}))
        ax.legend(fontsize=7)
        ax.set_title(f"{t.teacher['config']['model']} on {t.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", type=Path, nargs="+", help="comparison directories, one per task")
    ap.add_argument("--out", type=Path, default=None, help="where table.md and the PNG go (default: first root)")
    args = ap.parse_args()
    tasks = [load_task(r) for r in args.roots]
    out = args.out or args.roots[0]
    out.mkdir(parents=True, exist_ok=True)
    text = (f"## Methods\n\n{table(tasks, is_main, 'method')}\n\n"
            f"## Ablations\n\n{table(tasks, is_ablation, 'variant')}\n")
    if any(is_ptq(m) for t in tasks for m in t.rows):
        text += f"\n## Post-training quantization (no QAT)\n\n{table(tasks, is_ptq, 'initial scales of')}\n"
    print(text)
    (out / "table.md").write_text(text)
    if any(t.rows for t in tasks):
        plot(tasks, out / "ppl_vs_bits.png")
        print(f"wrote {out / 'table.md'} and {out / 'ppl_vs_bits.png'}")


if __name__ == "__main__":
    main()
