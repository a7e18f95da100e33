#!/usr/bin/env bash
# One GPU session in one command, from the repo root, most important evidence first: install, the
# loss tests on CUDA, the profile's ceilings and target shapes (fp64 check, time against the
# floor, breakdown), `python -m bench` at those shapes beside the peers (Liger; TRL's
# chunked-divergence kernel in the forward KL, reverse KL and JSD cases), then the profile's
# tuning sweeps and memory in N. Everything lands under $OUT (default ./gpu_out):
#   session.log          all output, as it happens (a run cut off at its limit still returns it)
#   profile.json/.md     python -m bench.gpu_profile
#   bench_results.json   python -m bench's results.json (re-render: python -m bench.report FILE)
#   all.tgz              the above plus pytest's junit XML and the bench tables and plots
# Budget: BUDGET_S seconds in all (default 560); each step gets a share and a hard timeout.
# Peers travel as wheels in .whl/ (see bench/README.md; TRL also needs accelerate, datasets,
# pandas and transformers where the image lacks them); absent ones are recorded as skipped.
# Extra arguments go to pytest's selection, e.g. `bench/gpu_session.sh -k jsd`.
# Rehearsal on CPU (tests/test_bench.py runs it): INSTALL=0 TEST_DEVICE=cpu, PROFILE_ARGS and
# BENCH_ARGS that say --device cpu and small sizes, a -k selection of a few tests.
set -u
OUT=${OUT:-$PWD/gpu_out}
BUDGET_S=${BUDGET_S:-560}
STEPS=${STEPS:-tests,profile,bench}
INSTALL=${INSTALL:-1}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
stamp() { echo "=== [$(($(date +%s) - start))s] $*"; }
pack() { tar czf "$OUT/all.tgz" -C "$OUT" --exclude all.tgz . 2>/dev/null; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  || echo "no nvidia-smi"
python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

stamp "install"
if [ "$INSTALL" = 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$INSTALL" = 1 ] && ! python3 -m pip install -q --no-deps --no-build-isolation -e . \
    2>"$OUT/pip.err"; then
  echo "pip install -e . failed (see pip.err); importing from a copy instead"
  rm -rf /tmp/fastkd_src && mkdir -p /tmp/fastkd_src && cp -r fastkd /tmp/fastkd_src/ \
    && cp -r kernels /tmp/fastkd_src/fastkd/kernels
  export PYTHONPATH=/tmp/fastkd_src${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import fastkd, fastkd.kernels.dense; print('fastkd', fastkd.__version__, \
fastkd.__file__)" || exit 1
python3 -m pip list 2>/dev/null | grep -i -E "^(liger|cut.cross|trl|transformers|torch|triton) " \
  || true

if [[ $STEPS == *tests* ]]; then
  stamp "pytest on CUDA (the loss and API tests; the kernels compiled, not interpreted)"
  # pytest-xdist (in the GPU image) spreads the tests, and so the kernels' compilation, over CPUs
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${PYTEST_WORKERS:-6}")
  FASTKD_TEST_DEVICE=${TEST_DEVICE:-cuda} timeout $(( $(left) / 3 )) \
    python3 -m pytest -q -p no:cacheprovider ${workers:-} tests/test_dense.py \
    tests/test_loss_api.py tests/test_sparse.py -k "not hopper" --junitxml="$OUT/pytest_cuda.xml" "$@"
  echo "pytest exit $?"
  pack
fi

# Most important evidence first, so that a run cut off at its limit still returns it:
# correctness (above), then the target shapes (fp64 check, time against the floor, breakdown),
# then those shapes beside the peers, then the tuning sweeps.
if [[ $STEPS == *profile* ]]; then
  stamp "profile: ceilings and the target shapes"
  timeout $(( $(left) * 2 / 5 )) python3 -m bench.gpu_profile --out "$OUT" ${PROFILE_ARGS:-} \
    --steps ceilings,targets
  echo "profile exit $?"
  pack
fi

if [[ $STEPS == *bench* ]]; then
  stamp "python -m bench (target shapes, fastkd beside the reference and the peers)"
  bench_out=$(mktemp -d)
  # kd, rkl, jsd: forward KL, reverse KL and JSD alone, where TRL's kernel (trl) runs; floor:
  # the GEMMs alone; compile and lce (F.linear_cross_entropy): what a plain-torch user picks
  timeout $(( $(left) * 2 / 3 )) python3 -m bench --quick --out "$bench_out" \
    ${BENCH_ARGS:---preset llama,gemma --sweep-n 8192 --sweep-v none \
    --cases distill,kd,rkl,jsd,ce,sparse \
    --methods floor,fastkd,reference,compile,lce,liger,liger_kl,trl}
  echo "bench exit $?"
  cp "$bench_out/results.json" "$OUT/bench_results.json" 2>/dev/null
  mkdir -p "$OUT/bench" && cp "$bench_out"/* "$OUT/bench/" 2>/dev/null
  pack
fi

if [[ $STEPS == *profile* ]]; then
  stamp "profile: tuning sweeps (chunk, row kernel) and memory in N"
  timeout $(( $(left) - 15 )) python3 -m bench.gpu_profile --out "$OUT" ${PROFILE_ARGS:-} \
    --merge --steps chunks,row_kernel,flat_in_n
  echo "sweeps exit $?"
  pack
fi
stamp "done"
pack
