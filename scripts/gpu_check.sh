#!/usr/bin/env bash
# The one prepared GPU check, for a session that has the device machine (< 8 minutes there):
#   scripts/fetch_gpu_wheels.sh              (here, once: diffusers for the peer benchmark)
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Carried wheels -> /tmp/site; pip install -e . ; nvidia-smi and versions; then the steps listed
# below, each under its own timeout so one hang cannot eat the lease; logs into $OUT.
# The device machine's copy of the tree has no .git: pass the commit in, e.g.
#   run(command="TI_FAST_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh", ...)
# with the hash written out (the command runs there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$SECONDS
stamp() { echo "== [$((SECONDS - t0)) s] $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  stamp "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "wheel install FAILED (the peer rows will say so)"
fi
stamp "pip install -e ."
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3

{
  nvidia-smi
  python3 - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for m in ("triton", "transformers", "diffusers", "xformers", "bitsandbytes"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "absent:", type(e).__name__)
print("graph-safe generators:", hasattr(torch.cuda.CUDAGraph, "register_generator_state"))
PY
} 2>&1 | tee "$OUT/env.txt"

# Steps, in this order, chosen by TI_FAST_STEPS (default "bench profile tests"):
#   bench      the default benchmark (its results file is what the issue asks for, so it goes first)
#   compile    bench.train_throughput --compile-only at TI_FAST_COMPILE_BATCHES (default 8)
#   profile    bench.profile_step (where the step's GPU time goes)
#   attention  bench.bench_attention --sweep (the Triton attention kernel against SDPA's kernels)
#   lowvram    the --low-vram row alone (graphed, NHWC, 3 GiB cap) in a fresh process
#   cold       launch-to-first-step with an EMPTY Triton cache (a fresh machine's first launch)
#   tests      pytest -m gpu (TI_FAST_GPU_TESTS: test paths instead of all)
#   tiny       the benchmark at tiny shapes on the GPU (every CUDA path in ~30 s)
#   hypernetwork  bench.train_throughput --hypernetwork (graphed vs A1111-style vs the embedding step);
#              with its GPU tests: TI_FAST_STEPS="hypernetwork tests" TI_FAST_GPU_TESTS=tests/test_train_hypernetwork.py
#   runs       bench.train_throughput --runs (K = 1, 2, 4, 8 runs co-batched vs one after another)
STEPS=" ${TI_FAST_STEPS:-bench profile tests} "
has() { [[ "$STEPS" == *" $1 "* ]]; }

if has bench; then
  stamp "bench default run"
  timeout ${TI_FAST_BENCH_TIMEOUT:-270} python3 -m bench.train_throughput > "$OUT/bench.log" 2>&1
  echo "bench exit $?"; grep -v '^{' "$OUT/bench.log" | tail -48
  latest=$(tail -n 1 "$OUT/bench.log" | python3 -c "import json, sys; print(json.loads(sys.stdin.read()).get('results_file', ''))" 2>/dev/null)
  [ -n "$latest" ] && cp "$latest" "$OUT/" && echo "results: $latest (copy in \$OUT)"
fi

if has compile; then
  stamp "bench torch.compile rows"
  timeout ${TI_FAST_COMPILE_TIMEOUT:-200} python3 -m bench.train_throughput --compile-only --batches ${TI_FAST_COMPILE_BATCHES:-8} \
    --out "$OUT/compile" > "$OUT/bench_compile.log" 2>&1
  echo "compile bench exit $?"; grep -v '^{' "$OUT/bench_compile.log" | tail -12
fi

if has profile; then
  stamp "profile of the step"
  timeout 90 python3 -m bench.profile_step > "$OUT/profile.log" 2>&1
  echo "profile exit $?"; grep -v '^{' "$OUT/profile.log" | grep -v USDT | tail -70
fi

if has attention; then
  stamp "bench_attention --sweep"
  timeout ${TI_FAST_ATTN_TIMEOUT:-150} python3 -m bench.bench_attention --sweep > "$OUT/bench_attention.log" 2>&1
  echo "attention bench exit $?"; grep -v '^{' "$OUT/bench_attention.log" | tail -60
fi

if has lowvram; then
  stamp "low-vram row (graphed, NHWC, 3 GiB cap, fresh process)"
  timeout 120 python3 -m bench.train_throughput --row low-vram --cap 3 --channels-last --graph > "$OUT/lowvram.log" 2>&1
  echo "low-vram row exit $?"; tail -c 1500 "$OUT/lowvram.log"; echo
fi

if has cold; then
  stamp "cold launch (empty Triton cache, fresh process)"
  TRITON_CACHE_DIR=$(mktemp -d) timeout 150 python3 - > "$OUT/cold.log" 2>&1 <<'PY'
import json, tempfile, torch
from pathlib import Path
from bench.startup import write_model, launch_in_child
w = Path(tempfile.mkdtemp())
m = write_model(w / "model", torch.device("cuda"), False)
print(json.dumps(launch_in_child(w, m, torch.device("cuda"), 512)))
PY
  echo "cold launch exit $?"; tail -c 1500 "$OUT/cold.log"; echo
fi

if has tests; then
  stamp "pytest -m gpu"
  timeout ${TI_FAST_TESTS_TIMEOUT:-110} python3 -m pytest -q -m gpu -ra -p no:cacheprovider ${TI_FAST_GPU_TESTS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30
  echo "pytest exit ${PIPESTATUS[0]}"
fi

if has tiny; then
  stamp "bench --tiny on cuda (smoke)"
  timeout 60 python3 -m bench.train_throughput --tiny --device cuda --out "$OUT/tiny" > "$OUT/bench_tiny.log" 2>&1
  echo "tiny bench exit $?"; grep -v '^{' "$OUT/bench_tiny.log" | tail -25
fi
# a bench.train_throughput mode: its table, and a copy of its results file in $OUT
bench_mode() {   # bench_mode NAME TIMEOUT FLAG
  stamp "bench $3"
  timeout "$2" python3 -m bench.train_throughput "$3" > "$OUT/bench_$1.log" 2>&1
  echo "$1 bench exit $?"; grep -v '^{' "$OUT/bench_$1.log" | tail -20
  latest=$(tail -n 1 "$OUT/bench_$1.log" | python3 -c "import json, sys; print(json.loads(sys.stdin.read()).get('results_file', ''))" 2>/dev/null)
  [ -n "$latest" ] && cp "$latest" "$OUT/" && echo "results: $latest (copy in \$OUT)"
}
has hypernetwork && bench_mode hypernetwork "${TI_FAST_HN_TIMEOUT:-200}" --hypernetwork
has runs && bench_mode runs "${TI_FAST_RUNS_TIMEOUT:-200}" --runs
stamp "done"
