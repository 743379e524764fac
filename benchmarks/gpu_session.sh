#!/usr/bin/env bash
# The prepared GPU measurement of issue 7, sized for one device call of at most 10 minutes.
#
# On the lent GPU machine (jax, torch and transformers preinstalled), from the repo root, with the wheels that
# `bash ../shared/tools/device-wheels.sh` put in .whl/ carried along (av is not needed here):
#   bash benchmarks/gpu_session.sh [SECONDS]
# Parts run in order of importance, each bounded by what is left of SECONDS (default 570), so a cut-off call
# still returns the parts done. Results (JSON + logs) go to $OUT, or runs/bench/gpu when OUT is unset.
set -uo pipefail
budget=${1:-570}
deadline=$((SECONDS + budget))
out=${OUT:-runs/bench/gpu}
mkdir -p "$out"

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
}

# 1. The goals: ViT-B against PyTorch (compiled, SDPA, bf16 autocast), v1 and V2 modes; ViT-L. Profiles of the
#    jaxssl runs say where the step's time goes (time by kind of work, top kernels).
part gpu_BL --variants B,L --torch --torch-variants B --torch-compile --profile 3 --child-timeout 240
# 2. The levers behind the defaults, against the defaults: XLA attention, conv embedding, scan, remat, XLA flags.
part gpu_levers --variants B --levers --no-matmul --child-timeout 150 \
  --lever-names attention=xla,patch_embed=conv,scan_layers=on,remat=on,'XLA_FLAGS --xla_gpu_enable_triton_gemm=false'
# 3. ViT-g with remat at 6 clips per device.
part gpu_g --variants g --modes v2 --no-matmul --child-timeout 200
# 4. Larger per-device batches (MFU vs batch), as time allows.
part gpu_B128 --variants B --modes v2 --batch 128 --no-matmul --child-timeout 120
