#!/usr/bin/env bash
# The prepared GPU measurement of issue 7, sized for one device call of at most 10 minutes.
#
# On the lent GPU machine (jax, torch and transformers preinstalled), from the repo root, with the wheels that
# `bash ../shared/tools/device-wheels.sh` put in .whl/ carried along (av is not needed here):
#   bash benchmarks/gpu_session.sh [SECONDS] [PLAN]
# PLAN 'goals' (default) measures issue 7's goals and levers; 'profile' says where the step's time goes (traces,
# kernel families, the optimised HLO) without the PyTorch baseline. Parts run in order of importance, each bounded
# by what is left of SECONDS (default 570), so a cut-off call still returns the parts done. Results (JSON, logs,
# traces) go to runs/bench/gpu; when OUT is set (the device tool's return folder, which takes few files) they are
# also packed into $OUT/results.tgz after every part.
set -uo pipefail
budget=${1:-570}
plan=${2:-goals}
deadline=$((SECONDS + budget))
out=runs/bench/gpu
mkdir -p "$out"
pack() { if [ -n "${OUT:-}" ]; then tar -czf "$OUT/results.tgz" -C "$(dirname "$out")" "$(basename "$out")"; fi; }

if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >"$out/nvidia_smi.csv" 2>&1

# part NAME ARGS...: one benchmark invocation, stopped when the deadline comes.
part() {
  local name=$1 left=$((deadline - SECONDS))
  shift
  if ((left < 60)); then
    echo "skipped $name: ${left}s left" | tee -a "$out/skipped.txt"
    return
  fi
  echo "== $name (${left}s left)"
  timeout "$left" python3 benchmarks/train_throughput.py "$@" --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
  pack
}

if [ "$plan" = profile ]; then
  # 1. ViT-B V2 profiled, with its optimised HLO kept (one archive) to read fusions and layouts offline.
  XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*" \
    part prof_B --variants B --modes v2 --profile 3 --profile-dir "$out" --child-timeout 150
  tar -czf "$out/hlo_B.tgz" -C /tmp hlo 2>/dev/null
  pack
  # 2. Per-step overhead vs work: twice the batch; ViT-L; remat with the new defaults.
  part prof_B128 --variants B --modes v2 --batch 128 --no-matmul --profile 3 --child-timeout 150
  part prof_L --variants L --modes v2 --no-matmul --profile 3 --child-timeout 150
  part prof_levers --variants B --levers --no-matmul --child-timeout 150 --lever-names remat=on
  exit 0
fi

# 1. ViT-B V2 with the defaults (the unrolled scan since the 3rd session) against the levers its profile pointed
#    to: q, k, v as three matmuls (no strided copies / concatenations around cuDNN attention) and the tanh GELU.
part gpu_levers --variants B --levers --child-timeout 150 --lever-names qkv=split,gelu=tanh
# 2. The apples-to-apples goal: jaxssl v1 mode against PyTorch (compiled, SDPA, bf16 autocast).
part gpu_B_torch --variants B --modes v1 --torch --torch-compile --no-matmul --child-timeout 200
# 3. ViT-L V2, profiled.
part gpu_L --variants L --modes v2 --no-matmul --profile 3 --child-timeout 150
# 4. ViT-g with remat at 6 clips per device; larger per-device batches, as time allows.
part gpu_g --variants g --modes v2 --no-matmul --child-timeout 200
part gpu_B128 --variants B --modes v2 --batch 128 --no-matmul --child-timeout 120
