"""Token homogeneity of the teacher and of each trained student of a comparison (docs/method.md).

    python experiments/homogeneity.py experiments/results/wt2_small [--windows 16]

The paper motivates the token-level contrastive loss by the "homogeneous word embedding" problem:
the last-layer representations of a 2-bit GPT-2 trained with KD alone become too similar to one
another. This measures that on our runs: mean pairwise cosine similarity of the last hidden
layer over the tokens of the first --windows validation windows (128 tokens each, or the model's
context if shorter; the same metric as `val/homogeneity_*` of QuantStatsCallback), for the teacher and for every
stage=quantize run below the directory (rebuilt from its best checkpoint, as `qgplm.export`
does). If the students are no more homogeneous than the teacher, the contrastive term has no
collapse to undo at this scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from table import label, load_run  # experiments/table.py: the runs and row names of the comparison tables

from qgplm.distill.metrics import token_homogeneity
from qgplm.models import load_pretrained, load_tokenizer
from qgplm.train.student import load_student


def windows(tokenizer, data_file: Path, n: int, block: int = 128) -> torch.Tensor:
    text = data_file.read_text()[: 400 * n * block]
    ids = torch.tensor(tokenizer(text)["input_ids"][: n * block])
    if ids.numel() < n * block:
        raise SystemExit(f"{data_file} has fewer than {n} windows of {block} tokens")
    return ids.view(n, block)


@torch.no_grad()
def homogeneity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float(token_homogeneity(hidden, torch.ones_like(ids), max_tokens=ids.numel()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                    / "wikitext-2" / "wiki.valid.tokens")
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher_dir = args.root / "teacher" / "teacher"
    tok = load_tokenizer(str(teacher_dir))
    teacher = load_pretrained(str(teacher_dir)).eval()
    cfg = teacher.config
    block = min(128, getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 128))
    ids = windows(tok, args.data, args.windows, block)
    rows = [("teacher (FP32)", "-", homogeneity(teacher, ids), load_run(args.root / "teacher" / "metrics.json")
             ["teacher"]["test_ppl"])]
    as_is = args.root / "teacher_as_is"  # the pretrained model before fine-tuning (experiments/smollm2_rows.sh)
    if (as_is / "teacher").is_dir():
        rows.append(("pretrained model, not fine-tuned (FP32)", "-",
                     homogeneity(load_pretrained(str(as_is / "teacher")).eval(), ids),
                     load_run(as_is / "metrics.json")["teacher"]["test_ppl"]))
    for path in sorted(args.root.rglob("metrics.json")):
        m = load_run(path)
        c = m["config"]
        if c["stage"] != "quantize" or "student" not in m:
            continue
        student, _ = load_student(str(path.parent))
        name = label(m) + ("" if c.get("seed", 42) == 42 else f" seed {c['seed']}") + (
            " (no QAT)" if c.get("student_steps") == 0 else "")
        rows.append((name, c["bits"], homogeneity(student.eval(), ids), m["student"]["test_ppl"]))
        print(rows[-1], flush=True)
    print(f"\nlast-layer token homogeneity (mean pairwise cosine) on {ids.numel()} validation tokens "
          f"of {args.data.name}")
    print("| model | bits | homogeneity | test PPL |\n|---|---|---|---|")
    for name, bits, h, ppl in rows:
        print(f"| {name} | {bits} | {h:.4f} | {'-' if ppl is None else f'{ppl:.2f}'} |")


if __name__ == "__main__":
    main()
