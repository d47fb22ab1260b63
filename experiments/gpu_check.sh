#!/usr/bin/env bash
# One prepared GPU check of the GPU path (issue #16), < 8 minutes on one GPU. Needs only this repo,
# the shared data (../shared/data, or a path as first argument) and the machine's own CUDA
# PyTorch with qgplm's dependencies already installed: no downloads, no pip.
#   bash experiments/gpu_check.sh [DATA_DIR] [OUT_DIR]
# 1. the fast tests of the GPU path with CUDA visible (bf16, presets, FSDP set-up, bench);
# 2. a QAT pipeline run of a GPT-2-small-shaped model (12 x 768, random init, GPT-2's tokenizer
#    from the data dir) on WikiText-2 from the data dir, trainer=gpu (bf16-mixed), short budgets;
# 3. step time, peak GPU memory and tokens/s of FP fine-tuning, KD-only and QuantGPT
#    (experiments/bench_cost.py --size gpt2-small --device cuda --precision bf16-mixed).
# Everything is written under OUT_DIR (default: experiments/results/gpu_check/<timestamp>).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${1:-$ROOT/../shared/data}"
OUT="${2:-$ROOT/experiments/results/gpu_check/$(date +%Y%m%d-%H%M%S)}"
PY="${PYTHON:-python}"
cd "$ROOT"

fail() { echo "gpu_check: error: $*" >&2; exit 2; }
step() { echo; echo "=== gpu_check: $* ($(date +%T))"; }

[ -d "$DATA/wikitext-2" ] || fail "no WikiText-2 under $DATA (pass the shared data dir as the first argument)"
[ -f "$DATA/gpt2-tokenizer/vocab.json" ] || fail "no GPT-2 tokenizer under $DATA/gpt2-tokenizer"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "torch.cuda.is_available() is False: this needs a CUDA build of torch and a visible GPU"
"$PY" -c "import qgplm, lightning, transformers, hydra" 2>/dev/null \
  || fail "qgplm or its dependencies are not importable with $PY (install them first; this script downloads nothing)"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
T0=$SECONDS

step "1/3 fast tests with CUDA visible"
"$PY" -m pytest -q -x -m "not slow" -p no:cacheprovider tests/test_bf16.py tests/test_presets.py \
  tests/test_fsdp.py tests/test_bench_cost.py > "$OUT/tests.txt" 2>&1 \
  || { tail -n 30 "$OUT/tests.txt"; fail "fast tests failed: see $OUT/tests.txt"; }
tail -n 3 "$OUT/tests.txt"

step "2/3 QAT pipeline, GPT-2-small shape (12 x 768, random init), WikiText-2, trainer=gpu (bf16-mixed)"
"$PY" -m qgplm.run trainer=gpu task=wikitext2 task.data_dir="$DATA/wikitext-2" \
  model.tokenizer="$DATA/gpt2-tokenizer" model.config.n_layer=12 model.config.n_embd=768 model.config.n_head=12 \
  model.config.n_positions=1024 task.block_size=512 task.batch_size=8 task.eval_batch_size=16 \
  task.max_eval_tokens=100000 teacher.max_steps=100 teacher.eval_every=100 student.max_steps=100 \
  student.eval_every=100 method=quantgpt bits=2 generate_samples=1 logger=csv \
  hydra.run.dir="$OUT/qat_run" > "$OUT/qat_run.txt" 2>&1 \
  || { tail -n 30 "$OUT/qat_run.txt"; fail "the QAT run failed: see $OUT/qat_run.txt"; }
tail -n 12 "$OUT/qat_run.txt"
"$PY" - "$OUT/qat_run/metrics.json" <<'PYEOF'
import json, math, sys
m = json.load(open(sys.argv[1]))
t, s = m["teacher"]["test_ppl"], m["student"]["test_ppl"]
print(f"teacher test PPL {t:.2f}, W2E2A8 student {s:.2f}, wall time {m['wall_time_s']}")
sys.exit(0 if math.isfinite(t) and math.isfinite(s) else "non-finite perplexity")
PYEOF

step "3/3 step time / peak memory / tokens/s: FP fine-tuning, KD-only, QuantGPT (bf16-mixed)"
"$PY" experiments/bench_cost.py --size gpt2-small --device cuda --precision bf16-mixed --block 512 --batch 8 \
  --steps 20 --warmup 5 --json > "$OUT/bench_cost.txt" 2>&1 \
  || { tail -n 30 "$OUT/bench_cost.txt"; fail "the cost benchmark failed: see $OUT/bench_cost.txt"; }
grep -v '^{' "$OUT/bench_cost.txt"

echo
echo "gpu_check: all passed in $((SECONDS - T0)) s; outputs in $OUT"
