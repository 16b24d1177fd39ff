#!/bin/bash
# The device check for issue 15: gpu_speed.py --size tiny (smoke), base, large (+ variants), on the lent GPU.
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PY=${PY:-python3}
t0=$(date +%s)
{ nvidia-smi; $PY -c "import torch,sys; print(sys.version, torch.__version__, torch.version.cuda, torch.cuda.is_available())"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt | head -30
if [ -z "$NOINSTALL" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/easy_vqa-*.whl .whl/braceexpand-*.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tfsite .whl/transformers-*.whl .whl/regex-*.whl
  if PYTHONPATH=/tmp/tfsite:/tmp/site:src $PY -c "import transformers, vldistill.train.loop; print('transformers', transformers.__version__)"; then
    export PYTHONPATH=/tmp/tfsite:/tmp/site:src
  else
    echo "carried transformers failed to import; using the machine's"; export PYTHONPATH=/tmp/site:src
  fi
else
  export PYTHONPATH=src
fi
$PY -c "import transformers; print('using transformers', transformers.__version__)" | tee -a $OUT/env.txt
J=$OUT/gpu_speed.json
run() { echo "== $* ($(( $(date +%s) - t0 )) s in)"; timeout $1 $PY benchmarks/gpu_speed.py "${@:2}" --output $J 2>&1; echo "rc $? ($(( $(date +%s) - t0 )) s in)"; }
run ${T_TINY:-90} --size tiny ${DEV:+--device $DEV} | tee $OUT/tiny.log
run ${T_BASE:-120} --size base ${EXTRA} | tee $OUT/base.log
run ${T_LARGE:-330} --size large --variants ${EXTRA} | tee $OUT/large.log
echo "done in $(( $(date +%s) - t0 )) s"

# Then, on the same (warm) machine, two more calls:
#   python3 benchmarks/gpu_speed.py --size large --compile --output $OUT/gpu_speed_compile.json
#   python3 benchmarks/gpu_speed.py --size large --compile --teacher-dtype bfloat16 --output $OUT/gpu_speed_compile_bf16.json
#   python3 benchmarks/gpu_speed.py --size large --compile --teacher-dtype bfloat16 --batch-size 512 --steps 10 \
#       --output $OUT/gpu_speed_compile_bf16_b512.json
# The machine had no easy-vqa or braceexpand (imported by vldistill) and transformers 5.17.0: their wheels (and
# transformers 5.24.0, the version the tests here use, with regex) were carried in .whl/ and installed with
# pip --target, as the device tool's notes describe.
# 18:56 UTC, a fresh machine: the --compile run twice (timeout 95 s each) to repeat C/S; the first timed out while
# compiling on the cold machine, the second wrote gpu_speed_compile_repeat.json.
