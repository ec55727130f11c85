#!/usr/bin/env bash
# The GPU benchmark suite as one command within a time budget, for a CUDA host lent for a few minutes.
#
#     bench/gpu.sh [SECONDS]            # default 540: everything ends (and its files are written) by then
#
# Phases, each stopped at its share of what is left, so a slow one cannot take the others' time:
#   1. wiring on the GPU with the smoke models (seconds; a failure here stops the run before the big models);
#   2. bench/generate.py --random-weights (the eager fast path);
#   3. bench/interrogate.py --random-weights (every mode, 3 timed calls each);
#   4. each guide set's cost per image against none (bench/generate.py --keep $BENCH_GUIDES at batch 8)
#      and its peak memory (bench/memory.py --keep, CUDA max_memory_allocated; its JSON stays in /tmp, its
#      headline in summary.txt), the guides' random-weight models built on the first run (~2.3 GB);
#   5. Upscale (2×) on a result: one 1024² image kept from its 512² source with layout at the default
#      strength, against a plain 1024² image (bench/generate.py --keep none,layout:0.4 --size 1024);
#   6. bench/generate.py --random-weights --compile MODE for each of $BENCH_COMPILE while time is left.
# Files go to $OUT (or bench/results/gpu): env.txt (device and versions), log.txt (everything printed),
# summary.txt (each phase's last key=value line and how long it ran) and one JSON per benchmark, at most 8.
#
# A host without the model libraries gets them from wheels in .whl/ (bench/gpu-wheels.sh fetches them
# where PyPI is reachable), installed into /tmp/i2p2i-site. Knobs: BENCH_DEVICE (cuda), BENCH_MODELS
# (random-weights, or smoke for a dry run of the script itself on any machine), BENCH_WHEELS (.whl;
# a folder without wheels installs none), BENCH_COMPILE (space-separated MODE[+tuned][@BATCHES]: a
# torch.compile mode, "+tuned" for diffusers' Inductor settings, "@1,4,8" for its own batch sizes; empty
# for none), BENCH_COMPILE_BATCHES (4,8), BENCH_GUIDES (none,layout,edges,depth,look,edges+depth),
# BENCH_PHASES (which of "wiring generate interrogate guides upscale compile" to run: all),
# BENCH_CACHE (/tmp/i2p2i-bench), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

budget=${1:-540}
out=${OUT:-bench/results/gpu}
device=${BENCH_DEVICE:-cuda}
models=${BENCH_MODELS:-random-weights}
compile_modes=${BENCH_COMPILE-reduce-overhead reduce-overhead+tuned}
compile_batches=${BENCH_COMPILE_BATCHES:-4,8}
phases=" ${BENCH_PHASES:-wiring generate interrogate guides upscale compile} "
guide_sets=${BENCH_GUIDES:-none,layout,edges,depth,look,edges+depth}
cache=${BENCH_CACHE:-/tmp/i2p2i-bench}
python=${PYTHON:-python3}
wheels=${BENCH_WHEELS:-.whl}
mkdir -p "$out"
log=$out/log.txt
summary=$out/summary.txt
: >"$log"
: >"$summary"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
export TORCHINDUCTOR_CACHE_DIR=$cache/inductor

left() { echo $((budget - SECONDS)); }
say() { echo "gpu.sh [$(printf '%4d' "$SECONDS") s] $*"; }

if compgen -G "$wheels/*.whl" >/dev/null; then
  whl=("$wheels"/*.whl)
  say "installing ${#whl[@]} wheels from $wheels/"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/i2p2i-site "${whl[@]}" || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/i2p2i-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  nproc | sed 's/^/cpus /'
  "$python" - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
for name in ("diffusers", "transformers", "open_clip_torch", "clip-interrogator", "scikit-image", "triton", "timm",
             "tokenizers", "huggingface_hub", "safetensors", "accelerate", "numpy", "pillow", "aiosqlite"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
EOF
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# Short label lists (the first lines of each packaged one) keep the wiring phase to seconds.
labels=$cache/labels-short
mkdir -p "$labels"
data=$("$python" -c "import importlib.util as u, os
print(os.path.join(u.find_spec('clip_interrogator').submodule_search_locations[0], 'data'))") ||
  { say "clip_interrogator is not importable"; exit 1; }
for f in artists:40 flavors:100 mediums:20 movements:20 negative:20; do
  head -n "${f#*:}" "$data/${f%:*}.txt" >"$labels/${f%:*}.txt"
done

failed=0
# phase NAME SHARE_PERCENT CAP_S -- COMMAND...: run it for at most SHARE% of what is left (and CAP_S).
phase() {
  local name=$1 share=$2 cap=$3
  shift 4
  [[ $phases == *" ${name%%-*} "* ]] || return 0
  local limit=$(($(left) * share / 100))
  ((limit > cap)) && limit=$cap
  if ((limit < 30)); then
    say "$name: skipped, $(left) s left"
    echo "$name skipped=1 left_s=$(left)" >>"$summary"
    return 1
  fi
  say "$name: up to $limit s: $*"
  local started=$SECONDS rc
  timeout -k 10 "$limit" "$@" 2>&1 | tee "/tmp/i2p2i-phase.log"
  rc=${PIPESTATUS[0]}
  local last
  last=$(grep -E '^[a-z0-9_]+=[^ ]+( [a-z0-9_]+=[^ ]+)*$' /tmp/i2p2i-phase.log | tail -n 1)
  say "$name: exit $rc after $((SECONDS - started)) s"
  echo "$name rc=$rc wall_s=$((SECONDS - started)) $last" >>"$summary"
  ((rc == 0)) || failed=1
  return "$rc"
}

common=(--device "$device" --cache-dir "$cache")
if [[ $models == random-weights ]]; then
  big=(--random-weights)
  phase wiring-generate 20 120 -- "$python" bench/generate.py "${common[@]}" --reps 1 --warmup 1 \
    --batches 1,2 --users 2 --jobs-per-user 1 --images-per-job 2 --labels "$labels" \
    --json-out /tmp/i2p2i-wiring-generate.json || { say "stopping: the wiring check did not pass"; exit 1; }
  phase wiring-interrogate 20 120 -- "$python" bench/interrogate.py "${common[@]}" --reps 1 \
    --labels "$labels" --json-out /tmp/i2p2i-wiring-interrogate.json ||
    { say "stopping: the wiring check did not pass"; exit 1; }
else
  # A dry run of this script: the smoke models, short lists, one timed run each.
  big=(--labels "$labels" --reps 1)
  compile_modes=${BENCH_COMPILE-}
fi

phase generate 60 300 -- "$python" bench/generate.py "${common[@]}" "${big[@]}" --json-out "$out/generate.json"
iargs=("${big[@]}")
[[ $models == random-weights ]] && iargs+=(--reps 3)
phase interrogate 90 360 -- "$python" bench/interrogate.py "${common[@]}" "${iargs[@]}" \
  --json-out "$out/interrogate.json"
# Guides: 6 sets x 3 batches of 8 eager, then one measured batch each for memory.
gargs=("${big[@]}")
[[ $models == random-weights ]] && gargs+=(--reps 2)
phase guides 40 200 -- "$python" bench/generate.py "${common[@]}" "${gargs[@]}" --keep "$guide_sets" \
  --batches 8 --json-out "$out/generate-guides.json"
mbig=()
[[ $models == random-weights ]] && mbig=(--random-weights)
phase guides-memory 40 120 -- "$python" bench/memory.py --device "$device" --cache-dir "$cache" "${mbig[@]}" \
  --keep "$guide_sets" --batch 8 --json-out /tmp/i2p2i-memory-guides.json
# Upscale: its JSON stays in /tmp (at most 8 files come back), its headline in summary.txt.
# (The smoke models' dry run doubles their own 128-pixel side.)
upscale_side=1024
[[ $models == random-weights ]] || upscale_side=256
phase upscale 30 150 -- "$python" bench/generate.py "${common[@]}" "${gargs[@]}" --keep none,layout:0.4 \
  --size "$upscale_side" --batches 1 --json-out /tmp/i2p2i-upscale.json
for spec in $compile_modes; do
  # MODE[+tuned][@BATCHES]: "+tuned" adds diffusers' Inductor settings, "@4,8" its own batch sizes.
  mode=${spec%%@*} batches=$compile_batches tuning=()
  [[ $spec == *@* ]] && batches=${spec#*@}
  [[ $mode == *+tuned ]] && { mode=${mode%+tuned}; tuning=(--inductor-tuning); }
  file=$(tr -c 'a-z0-9+\n-' '-' <<<"$spec")
  phase "compile-$spec" 90 480 -- "$python" bench/generate.py "${common[@]}" "${big[@]}" --compile "$mode" \
    "${tuning[@]}" --no-fast-path-steps --batches "$batches" --json-out "$out/generate-compile-$file.json"
done

say "done, $(left) s of the budget left"
cat "$summary"
exit "$failed"
