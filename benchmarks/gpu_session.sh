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

# BENCH_ARGS, appended to every part, lets the plan be rehearsed on a CPU at tiny shapes (the last value wins):
#   BENCH_ARGS='--variants micro/8 --frames 4 --image-size 16 --batch 2 --steps 2 --warmup 0' bash benchmarks/gpu_session.sh
read -r -a extra <<<"${BENCH_ARGS:-}"

# part NAME ARGS...: one benchmark invocation, stopped when the deadline comes.
part() {
  local name=$1 left=$((deadline - SECONDS))
  shift
  if ((left < 60)); then
    echo "skipped $name: ${left}s left" | tee -a "$out/skipped.txt"
    return
  fi
  echo "== $name (${left}s left)"
  timeout "$left" python3 benchmarks/train_throughput.py "$@" "${extra[@]}" --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
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

# 1. ViT-B V2 at 128 clips (the per-step kernel gaps are a fixed cost: twice the batch halves their weight) with
#    the defaults against the GELU recomputed in the backward (same numbers), the tanh GELU (1.05x on 2026-11-27)
#    and q, k, v as three matmuls (1.01x), alone and with the recomputed GELU. (cuBLASLt and cuDNN's LayerNorm were
#    0.99x each on 2026-11-27: --lever-xla-flags=--xla_gpu_enable_cublaslt=true measures one again.)
part gpu_levers --variants B --batch 128 --levers --child-timeout 150 \
  --lever-names gelu=recompute,gelu=tanh,qkv=split,qkv=split+gelu=recompute
# The exact levers (same numbers) that were >= 1% faster carry on into the goal runs; the tanh GELU does not (it
# is not the reference's GELU: an opt-in for throughput runs).
winners=$(python3 - "$out/gpu_levers.json" <<'PY'
import json, sys
try:
    runs = json.load(open(sys.argv[1]))['runs']
except (OSError, ValueError, KeyError):
    runs = []
fast = [r['label'] for r in runs if r.get('speedup_vs_baseline', 0) >= 1.01]
exact = {'qkv=split': '--split-qkv', 'gelu=recompute': '--recompute-gelu'}  # the same numbers as the defaults
args = [flag for name, flag in exact.items() if name in fast]
flags = [label.split(' ', 1)[1] for label in fast if label.startswith('XLA_FLAGS ')]
print(' '.join(args), '|', ' '.join(flags))
PY
)
read -r -a won_args <<<"${winners%%|*}"
read -r -a won_flags <<<"${XLA_FLAGS:-} ${winners#*|}"
# XLA reads a blank XLA_FLAGS as a file name and aborts (the 2026-11-27 call lost its goal parts to that).
if ((${#won_flags[@]})); then export XLA_FLAGS="${won_flags[*]}"; else unset XLA_FLAGS; fi
echo "kept for the goal runs: args '${won_args[*]}', XLA_FLAGS '${XLA_FLAGS:-}'" | tee "$out/kept.txt"
# 2. The MFU goals at larger per-device batches, with what won: ViT-B at 256 clips, ViT-L at 128.
part gpu_B256 --variants B --modes v2 --batch 256 --no-matmul --child-timeout 120 "${won_args[@]}"
part gpu_L128 --variants L --modes v2 --batch 128 --no-matmul --child-timeout 150 "${won_args[@]}"
# 3. Continuity with the earlier tables (64 and 32 clips), then ViT-g with remat at 24 clips, as time allows.
part gpu_B64_L32 --variants B,L --modes v2 --no-matmul --child-timeout 120 "${won_args[@]}"
part gpu_g24 --variants g --modes v2 --batch 24 --no-matmul --child-timeout 200 "${won_args[@]}"
