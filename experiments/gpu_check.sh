#!/usr/bin/env bash
# One prepared GPU check of the GPU path (issue #16), < 8 minutes on one GPU. Needs only this repo
# and the machine's own CUDA PyTorch: no downloads. What the machine lacks travels with the repo in
# .gpu_bundle/ (ignored by git), made here by `make gpu-bundle`:
#   - wheels/: qgplm's pure-Python dependencies missing from a bare CUDA image (hydra-core,
#     omegaconf, antlr4, rouge-score, nltk, gguf), installed offline (pip --no-index) into a
#     temporary folder on PYTHONPATH; nothing else on the machine changes;
#   - data/: a copy of ../shared/data (WikiText-2, the tokenizers, the samples the tests read).
#   bash experiments/gpu_check.sh [DATA_DIR] [OUT_DIR]
# DATA_DIR defaults to $QGPLM_DATA_DIR, then .gpu_bundle/data, then ../shared/data.
# 1. the fast tests of the GPU path with CUDA visible (tests/test_cuda.py's CUDA half, bf16,
#    presets, FSDP set-up, bench);
# 2. a QAT pipeline run of a GPT-2-small-shaped model (12 x 768, random init, GPT-2's tokenizer
#    from the data dir) on WikiText-2 from the data dir, trainer=gpu (bf16-mixed), short budgets;
# 3. step time, peak GPU memory and tokens/s of FP fine-tuning, KD-only and QuantGPT
#    (experiments/bench_cost.py at GPT-2 small's size, cuda, bf16-mixed).
# Everything is written under OUT_DIR (default: experiments/results/gpu_check/<timestamp>).
# GPU_CHECK_SMOKE=1 runs the same steps on the CPU at toy sizes (step 1 only collects the tests),
# to check the script itself (tests/test_bench_cost.py); its figures mean nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${GPU_CHECK_BUNDLE:-$ROOT/.gpu_bundle}"
if [ -n "${1:-}" ]; then DATA="$1"
elif [ -n "${QGPLM_DATA_DIR:-}" ]; then DATA="$QGPLM_DATA_DIR"
elif [ -d "$BUNDLE/data" ]; then DATA="$BUNDLE/data"
else DATA="$ROOT/../shared/data"; fi
OUT="${2:-$ROOT/experiments/results/gpu_check/$(date +%Y%m%d-%H%M%S)}"
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
cd "$ROOT"

fail() { echo "gpu_check: error: $*" >&2; exit 2; }
step() { echo; echo "=== gpu_check: $* ($(date +%T))"; }

# what runs where: GPT-2 small's shape on the GPU; toy sizes on the CPU in smoke mode
QAT_SIZE=(model.config.n_layer=12 model.config.n_embd=768 model.config.n_head=12 model.config.n_positions=1024
          task.block_size=512 task.batch_size=8 task.eval_batch_size=16 task.max_eval_tokens=100000)
QAT_BUDGET=(teacher.max_steps=100 teacher.eval_every=100 student.max_steps=100 student.eval_every=100)
QAT_TRAINER=(trainer=gpu)
BENCH=(--size gpt2-small --device cuda --precision bf16-mixed --block 512 --batch 8 --steps 20 --warmup 5)
TESTS=(-m "not slow")
if [ "$SMOKE" = 1 ]; then
  QAT_SIZE=(model.config.n_layer=1 model.config.n_embd=32 model.config.n_head=2 model.config.n_positions=64
            task.block_size=32 task.batch_size=4 task.eval_batch_size=8 task.max_train_tokens=4000
            task.max_eval_tokens=1000)
  QAT_BUDGET=(teacher.max_steps=4 teacher.eval_every=4 student.max_steps=4 student.eval_every=4)
  QAT_TRAINER=(trainer=cpu trainer.precision=bf16-mixed)
  BENCH=(--layers 1 --width 64 --vocab 128 --block 16 --batch 2 --steps 2 --warmup 1 --device cpu
         --precision bf16-mixed)
  TESTS=(--collect-only -m "not slow")
fi

[ -d "$DATA/wikitext-2" ] || fail "no WikiText-2 under $DATA (pass the data dir as the first argument, or make gpu-bundle)"
[ -f "$DATA/gpt2-tokenizer/vocab.json" ] || fail "no GPT-2 tokenizer under $DATA/gpt2-tokenizer"
DATA="$(cd "$DATA" && pwd)"
if [ "$SMOKE" != 1 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "torch.cuda.is_available() is False: this needs a CUDA build of torch and a visible GPU"
fi
SITE=""
if compgen -G "$BUNDLE/wheels/*.whl" > /dev/null; then
  # offline (--no-index), only the carried wheels (--no-deps), into a folder of its own
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/qgplm-gpu-site.XXXXXX")"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
    "$BUNDLE"/wheels/*.whl || fail "installing the carried wheels from $BUNDLE/wheels failed (make gpu-bundle again)"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 QGPLM_DATA_DIR="$DATA"
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import qgplm, lightning, transformers, hydra, omegaconf" 2>/dev/null \
  || fail "qgplm or its dependencies are not importable with $PY (make gpu-bundle here, carry .gpu_bundle; this script downloads nothing)"
mkdir -p "$OUT"
"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import hydra, lightning, torch, transformers
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (smoke mode)"
print(f"torch {torch.__version__} cuda {torch.version.cuda} {dev}; lightning {lightning.__version__}, "
      f"transformers {transformers.__version__}, hydra {hydra.__version__}")
PYEOF
T0=$SECONDS

step "1/3 fast tests with CUDA visible"
"$PY" -m pytest -q -x "${TESTS[@]}" -p no:cacheprovider tests/test_cuda.py tests/test_bf16.py tests/test_presets.py \
  tests/test_fsdp.py tests/test_bench_cost.py > "$OUT/tests.txt" 2>&1 \
  || { tail -n 30 "$OUT/tests.txt"; fail "fast tests failed: see $OUT/tests.txt"; }
tail -n 3 "$OUT/tests.txt"

step "2/3 QAT pipeline, GPT-2-small shape (12 x 768, random init), WikiText-2, trainer=gpu (bf16-mixed)"
"$PY" -m qgplm.run "${QAT_TRAINER[@]}" task=wikitext2 task.data_dir="$DATA/wikitext-2" \
  model.tokenizer="$DATA/gpt2-tokenizer" "${QAT_SIZE[@]}" "${QAT_BUDGET[@]}" \
  method=quantgpt bits=2 generate_samples=1 logger=csv hydra.run.dir="$OUT/qat_run" > "$OUT/qat_run.txt" 2>&1 \
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
"$PY" experiments/bench_cost.py "${BENCH[@]}" --json > "$OUT/bench_cost.txt" 2>&1 \
  || { tail -n 30 "$OUT/bench_cost.txt"; fail "the cost benchmark failed: see $OUT/bench_cost.txt"; }
grep -v '^{' "$OUT/bench_cost.txt"

echo
echo "gpu_check: all passed in $((SECONDS - T0)) s; outputs in $OUT"
