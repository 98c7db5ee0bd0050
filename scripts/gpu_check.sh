#!/usr/bin/env bash
# The one prepared GPU check, for a session that has the device machine (< 8 minutes there):
#   scripts/fetch_gpu_wheels.sh              (here, once: diffusers for the peer benchmark)
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Steps, each under its own timeout so one hang cannot eat the lease:
#   carried wheels -> /tmp/site; pip install -e . ; nvidia-smi and versions;
#   the default 512 px benchmark (results JSON into bench/results/ there and into $OUT);
#   bench.profile_step (where the eager step's GPU time goes); pytest -m gpu (kernel tests,
#   graphed == eager step, the trainer on CUDA); with TI_FAST_TINY_SMOKE=1 also the benchmark at
#   tiny shapes on the GPU; logs copied into $OUT (at most 8 files come back).
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

# The default bench first: its results file is what the issue asks for, so nothing else may eat
# its time. Then a profile of the eager step, then the GPU tests.
stamp "bench default run"
timeout ${TI_FAST_BENCH_TIMEOUT:-270} python3 -m bench.train_throughput > "$OUT/bench.log" 2>&1
echo "bench exit $?"; grep -v '^{' "$OUT/bench.log" | tail -45
latest=$(tail -n 1 "$OUT/bench.log" | python3 -c "import json, sys; print(json.loads(sys.stdin.read()).get('results_file', ''))" 2>/dev/null)
[ -n "$latest" ] && cp "$latest" "$OUT/" && echo "results: $latest (copy in \$OUT)"

if [ -n "${TI_FAST_BENCH_ONLY:-}" ]; then stamp "done (bench only)"; exit 0; fi

stamp "profile of the eager step"
timeout 90 python3 -m bench.profile_step > "$OUT/profile.log" 2>&1
echo "profile exit $?"; grep -v '^{' "$OUT/profile.log" | grep -v USDT | tail -70

stamp "pytest -m gpu"
# TI_FAST_GPU_TESTS: test paths to run instead of all (e.g. when the kernels are unchanged)
timeout 110 python3 -m pytest -q -m gpu -ra -p no:cacheprovider ${TI_FAST_GPU_TESTS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30
echo "pytest exit ${PIPESTATUS[0]}"

if [ -n "${TI_FAST_TINY_SMOKE:-}" ]; then   # the tiny shapes on the GPU: every CUDA path in ~30 s
  stamp "bench --tiny on cuda (smoke)"
  timeout 60 python3 -m bench.train_throughput --tiny --device cuda --out "$OUT/tiny" > "$OUT/bench_tiny.log" 2>&1
  echo "tiny bench exit $?"; grep -v '^{' "$OUT/bench_tiny.log" | tail -25
fi
stamp "done"
