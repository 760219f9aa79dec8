#!/usr/bin/env bash
# GPU check, on a machine with one GPU, in under 8 minutes:
#   1. nvidia-smi and the GPUs TensorFlow sees (stops here, exit 2, when there is none);
#   2. the default pipeline (`dvc repro`) in a temporary copy of this working tree, with
#      precision auto (mixed_float16 on a GPU of compute capability 7.0+) and jit_compile auto
#      (XLA on a GPU): the time of every stage, then what each model.json says it trained with;
#   3. `visionpipe benchmark`'s GPU rows for the models that trained, into
#      reports/benchmark-gpu.json (and .png) of this repository.
# Nothing in this working tree changes but reports/benchmark-gpu.{json,png}.
#
# Usage: scripts/gpu_check.sh [--quick] [--keep]
#   --quick  a tiny pipeline (the MLP on 32x32 images, 1 epoch) and a quick benchmark; with
#            GPU_CHECK_ALLOW_CPU=1 it also runs without a GPU (a check of this script on a CPU
#            machine: its benchmark JSON then stays in the temporary folder)
#   --keep   keep the temporary copy (its path is printed)
# Per-step limits in seconds (the defaults add up to under 8 minutes):
#   GPU_CHECK_PROBE_S=60 GPU_CHECK_REPRO_S=300 GPU_CHECK_BENCH_S=120
# GPU_CHECK_BENCH_ARGS: the benchmark's options (default: --skip precision,threads,scaling
#   --repeats 2; --quick: --quick --skip threads,scaling).
set -euo pipefail

QUICK=0
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
PROBE_S="${GPU_CHECK_PROBE_S:-60}"
REPRO_S="${GPU_CHECK_REPRO_S:-300}"
BENCH_S="${GPU_CHECK_BENCH_S:-120}"
STARTED=$SECONDS
FAILED=()

step() { echo; echo "== gpu_check: $* (at $((SECONDS - STARTED)) s)"; }

# ------------------------------------------------------------------ 1. the GPU
step "1/3 the GPU"
GPU=1
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 30 nvidia-smi || { echo "gpu_check: nvidia-smi failed (exit $?)"; GPU=0; }
else
  echo "gpu_check: nvidia-smi not found"
  GPU=0
fi
PROBE=$(timeout "$PROBE_S" python - <<'EOF' 2>/dev/null
import tensorflow as tf

gpus = tf.config.list_physical_devices("GPU")
for gpu in gpus:
    details = tf.config.experimental.get_device_details(gpu)
    cc = details.get("compute_capability")
    print(f"TensorFlow {tf.__version__} sees {gpu.name}: {details.get('device_name')}, "
          f"compute capability {'.'.join(map(str, cc)) if cc else 'unknown'}")
print(len(gpus))
EOF
) || PROBE=""
SEEN=$(printf '%s\n' "$PROBE" | tail -n 1)
printf '%s\n' "$PROBE" | sed '$d'
case "$SEEN" in ''|*[!0-9]*) SEEN=0 ;; esac
if [ "$SEEN" -eq 0 ]; then
  echo "gpu_check: TensorFlow sees no GPU"
  GPU=0
fi
if [ "$GPU" -eq 0 ] || [ "$SEEN" -eq 0 ]; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" = "1" ] && [ "$QUICK" -eq 1 ]; then
    echo "gpu_check: no GPU; GPU_CHECK_ALLOW_CPU=1 --quick: checking this script on the CPU"
    GPU=0
  else
    echo "gpu_check: error: no GPU visible to TensorFlow (see above); this check needs a" \
         "machine with one GPU and TensorFlow's CUDA libraries (pip install" \
         "'tensorflow[and-cuda]'). Nothing was run." >&2
    exit 2
  fi
fi

# ------------------------------------------------------------------ 2. the pipeline
step "2/3 dvc repro in a temporary copy of $REPO"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/visionpipe-gpu-check.XXXXXX")"
cleanup() {
  if [ "$KEEP" -eq 1 ]; then echo "gpu_check: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
COPY="$WORK/repo"
timeout 60 git clone --quiet "$REPO" "$COPY"
# The working tree as it is (uncommitted edits and new files too), not only the last commit.
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
   | timeout 60 tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) \
  | tar -xf - -C "$COPY"
cd "$COPY"
python - "$QUICK" <<'EOF'
"""Params of the copy: precision and jit_compile auto for every model (mixed precision and
XLA wherever the machine has them); --quick: the MLP alone, tiny."""
import sys

import yaml

quick = sys.argv[1] == "1"
params = yaml.safe_load(open("params.yaml"))
changed = []
for name, model in params["models"].items():
    for key in ("precision", "jit_compile"):
        if model["train"].get(key) != "auto":
            changed.append(f"models.{name}.train.{key}: {model['train'].get(key)} -> auto")
            model["train"][key] = "auto"
if quick:
    params["models"] = {"mlp": params["models"]["mlp"]}
    for section in ("prepare", "augment"):
        params[section] = {"classification": params[section]["classification"]}
    params["prepare"]["classification"].update(
        image_size=[32, 32], splits={"train": 96, "val": 32, "test": 40}, shard_size=50)
    params["augment"]["classification"]["preview"] = 4
    params["models"]["mlp"]["architecture"].update(hidden_units=[32], input_pool=1)
    params["models"]["mlp"]["train"].update(epochs=1, batch_size=16)
    params["evaluate"].update(latency_samples=5, latency_warmup=1)
    changed.append("--quick: the MLP alone, 32x32 images, 96 train images, 1 epoch")
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
print("gpu_check: params of the copy: " + ("; ".join(changed) or "unchanged (already auto)"))
EOF
cat > "$WORK/stage_times.py" <<'EOF'
"""Pass dvc repro's output through, each line with the seconds since the start, then the time
of every stage (from its "Running stage" line to the next one or the end)."""
import re
import sys
import time

start = time.perf_counter()
stages, current, began = [], None, start
for line in sys.stdin:
    now = time.perf_counter()
    found = re.match(r"Running stage '([^']+)'", line)
    if found:
        if current:
            stages.append((current, now - began))
        current, began = found.group(1), now
    print(f"[{now - start:6.1f} s] {line}", end="", flush=True)
end = time.perf_counter()
if current:
    stages.append((current, end - began))
print("\ngpu_check: stage times (s), dvc's own work included")
for name, seconds in stages:
    print(f"  {name:28} {seconds:7.1f}")
print(f"  {'total':28} {end - start:7.1f}")
EOF
RC=0
timeout --kill-after=20 "$REPRO_S" dvc repro --keep-going 2>&1 \
  | python -u "$WORK/stage_times.py" || RC=$?
if [ "$RC" -ne 0 ]; then
  FAILED+=("dvc repro (exit $RC$([ "$RC" -eq 124 ] && echo ": over ${REPRO_S} s"))")
fi
timeout 120 visionpipe summary || echo "gpu_check: visionpipe summary failed"

# What each model trained with: on a GPU, mixed_float16 and XLA are expected.
TRAINED=$(python - "$GPU" <<'EOF'
import json
import sys
from pathlib import Path

import yaml

on_gpu = sys.argv[1] == "1"
ok, problems = [], []
for name in yaml.safe_load(open("params.yaml"))["models"]:
    path = Path("models") / name / "model.json"
    if not path.exists():
        problems.append(f"train@{name} did not finish (no {path})")
        continue
    meta = json.loads(path.read_text())
    print(f"gpu_check: train@{name}: precision {meta.get('precision')} "
          f"({meta.get('precision_reason', 'no reason recorded')}), XLA "
          f"{meta.get('jit_compile')}, threads {meta.get('threads')}", file=sys.stderr)
    # Families that train in float32 only (their registry entry's float32_only) say so.
    wanted = ("float32" if "trains in float32 only" in meta.get("precision_reason", "")
              else "mixed_float16")
    if on_gpu and (meta.get("precision") != wanted or meta.get("jit_compile") is not True):
        problems.append(f"train@{name} trained with {meta.get('precision')} and XLA "
                        f"{meta.get('jit_compile')}, not {wanted} and XLA")
    ok.append(name)
for line in problems:
    print(f"gpu_check: problem: {line}", file=sys.stderr)
print(",".join(ok))
sys.exit(1 if problems else 0)
EOF
) || FAILED+=("precision/XLA check (problems above)")

# ------------------------------------------------------------------ 3. the benchmark
step "3/3 visionpipe benchmark: GPU rows"
if [ -z "$TRAINED" ]; then
  FAILED+=("benchmark (no model trained)")
else
  if [ "$QUICK" -eq 1 ]; then
    ARGS="${GPU_CHECK_BENCH_ARGS:---quick --skip threads,scaling}"
  else
    ARGS="${GPU_CHECK_BENCH_ARGS:---skip precision,threads,scaling --repeats 2}"
  fi
  if [ "$GPU" -eq 1 ]; then OUT="$REPO/reports"; else OUT="$WORK/reports"; fi
  LEFT=$(( 480 - (SECONDS - STARTED) ))
  LIMIT=$(( LEFT < BENCH_S ? (LEFT > 60 ? LEFT : 60) : BENCH_S ))
  RC=0
  # shellcheck disable=SC2086  # ARGS holds several options
  timeout --kill-after=20 "$LIMIT" visionpipe benchmark --models "$TRAINED" $ARGS \
    --output "$OUT" --json-name benchmark-gpu.json || RC=$?
  if [ "$RC" -ne 0 ]; then
    FAILED+=("benchmark (exit $RC$([ "$RC" -eq 124 ] && echo ": over ${LIMIT} s"))")
  else
    echo "gpu_check: wrote $OUT/benchmark-gpu.json and $OUT/benchmark-gpu.png"
  fi
fi

echo
echo "== gpu_check: done in $((SECONDS - STARTED)) s"
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'gpu_check: failed: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "gpu_check: every step passed"
