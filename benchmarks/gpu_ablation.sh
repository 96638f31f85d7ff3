#!/usr/bin/env bash
# The speed ablation (Chen et al. 2023, "Speed is all you need") on one CUDA GPU.  Estimated from the one H100
# run so far (which hit its limit before the last four SD-shaped option sets, since trimmed): the ablation about
# 4-4.5 minutes (most of it torch.compile, cuDNN autotuning and graph capture), the targets about 2, the tests
# 1.5-2 (SPEED_TESTS=none or STEPS skip them):
#   1. the CUDA speed tests (tests/test_speed.py -k cuda: every option equals the reference; CUDA graphs),
#   2. the ablation of benchmarks/speed_ablation.py (3 networks x 2 batches x 11 option sets),
#   3. the issue's GPU targets: sampling-loop overhead at batch 512 (digits U-Net; eager, per-call CUDA graph,
#      whole loop as one graph) and, when diffusers is importable, our DDPM CIFAR-10 U-Net (bf16, every option,
#      without and with whole-network torch.compile) against diffusers' UNet2DModel + torch.compile.
# The timings above are from the H100 run before the Triton kernel set, the whole-loop graph and the compiled
# comparison were added (those are not yet run on a GPU).
# Records (labelled with the GPU's name) go to $OUT/speed/gpu/records.jsonl ($OUT defaults to results), and the
# regenerated tables to $OUT/speed/gpu/tables.md.  Every step has its own time limit; a step that fails or runs
# out of time leaves the records written so far and the script goes on (exit status 1 at the end).
#
#   bash benchmarks/gpu_ablation.sh                 # from the repository root, python3 with torch + CUDA
#   OUT=/tmp/out PYTHON=python bash benchmarks/gpu_ablation.sh
#   STEPS="ablation" bash benchmarks/gpu_ablation.sh   # only the ablation (the part that must fit in 5 minutes)
#
# diffusers (optional, never a runtime dependency): `pip install -e '.[compare]'`, or, on a machine without
# network access, wheels of diffusers and importlib_metadata in .whl/ (installed to a private folder here).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST="${OUT:-results}/speed/gpu"
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

step "device"
$PY - <<'PY' || { echo "no CUDA device: this script is for a GPU (use speed_ablation.py --device cpu)"; exit 2; }
import torch
assert torch.cuda.is_available(), "CUDA is not available"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.backends.cudnn.version())
PY

if ! $PY -c "import diffusers" 2>/dev/null && ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  step "installing the carried diffusers wheel into /tmp/diffbench-site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/diffbench-site \
      .whl/diffusers-*.whl $(ls .whl/importlib_metadata-*.whl 2>/dev/null) \
    && export PYTHONPATH="$PYTHONPATH:/tmp/diffbench-site" || echo "diffusers wheel did not install: comparison skipped"
fi

# STEPS: which of "tests ablation targets" to run (default all three; e.g. STEPS="ablation targets")
STEPS=${STEPS:-tests ablation targets}
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# SPEED_TESTS: cuda (default: the CUDA tests; the CPU ones run everywhere), all, or none
if want tests && [ "${SPEED_TESTS:-cuda}" != none ]; then
  step "tests/test_speed.py on CUDA (SPEED_TESTS=${SPEED_TESTS:-cuda})"
  if [ "${SPEED_TESTS:-cuda}" = all ]; then sel=(); else sel=(-k cuda); fi
  timeout 120 $PY -m pytest tests/test_speed.py -x -q -p no:cacheprovider "${sel[@]}" || { echo "!!! speed tests failed"; status=1; }
fi

if want ablation; then
  step "ablation -> $DEST"
  timeout 290 $PY benchmarks/speed_ablation.py --device cuda --out "$DEST" || { echo "!!! ablation failed or ran out of time"; status=1; }
fi

if want targets; then
  # two whole-network torch.compile runs (ours, diffusers'): about 40 s each on the H100 host
  step "targets: sampling-loop overhead (batch 512) and the diffusers comparison"
  timeout 200 $PY benchmarks/speed_ablation.py --device cuda --out "$DEST" --no-ablation --targets \
    || { echo "!!! targets failed or ran out of time"; status=1; }
fi

step "tables"
$PY - "$DEST" <<'PY' || status=1
import sys
from bench_core.records import load_records
from bench_core.report.leaderboard import markdown_table, records_df
from bench_core.report.scorecard import scorecard, scorecard_markdown
from reproductions.speed import SPEED_REPRO
recs = load_records(sys.argv[1])
parts = []
for title, t in SPEED_REPRO.tables(records_df(recs)).items():
    parts += [f"#### {title}", "", markdown_table(t), ""]
sc = scorecard(recs)
parts.append(scorecard_markdown(sc[sc["reproduction"] == "speed"]))
text = "\n".join(parts) + "\n"
open(f"{sys.argv[1]}/tables.md", "w").write(text)
print(text)
PY
step "done (status $status)"
exit $status
