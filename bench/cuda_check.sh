#!/usr/bin/env bash
# Everything sfdiag checks on a GPU, in one go (a lent GPU machine's time is short):
# the CUDA tests, the CUDA bench, a profile of the auditor's hooks. Logs under $OUT.
#
#   OUT=/tmp/cuda bash bench/cuda_check.sh
#
# Needs a python3 with torch (CUDA), typer, rich, pandas, pyyaml, pytest and tensorboard.
# The public schedulefree release is installed from .whl/ where that folder holds its
# wheel (pip download --no-deps schedulefree==1.4.1 -d .whl): machines without a network.
set -u
OUT=${OUT:-/tmp/sfdiag-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sfdiag-site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/sfdiag-site
fi

step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi -L
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"

step "tests/test_cuda.py"
timeout "${TESTS_S:-170}" python3 -m pytest tests/test_cuda.py -rfE --durations=8 \
    >"$OUT/tests.log" 2>&1
echo "pytest exit $?"
tail -n 25 "$OUT/tests.log"

step "bench/run.py --device cuda"
timeout "${BENCH_S:-110}" python3 bench/run.py --device cuda --json \
    >"$OUT/cuda.json" 2>"$OUT/bench.err"
echo "bench exit $?"
tail -n 5 "$OUT/bench.err"

step "bench/profile_hooks.py --device cuda"
timeout "${PROFILE_S:-40}" python3 bench/profile_hooks.py --device cuda --top 30 \
    >"$OUT/profile.txt" 2>&1
echo "profile exit $?"
head -n 45 "$OUT/profile.txt"

step "figures"
python3 - "$OUT/cuda.json" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from render import render_cuda
try:
    print(render_cuda(json.load(open(sys.argv[1]))["cuda"]))
except Exception as exc:
    print(f"no figures: {type(exc).__name__}: {exc}")
EOF
