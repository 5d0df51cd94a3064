# call 3: today's main before this work (09bc105) on the same card: forced 120 at 256 rows (its default 768 OOMs)
source .device/setup.sh || exit 1
cd .device/oldmain && export PYTHONPATH=/tmp/site:$PWD
AO_BATCH_ROWS=256 AO_OUT=/tmp/old python3 -m pytest -m gpu -p no:cacheprovider -x -q -s tests/experiments/test_full_experiment.py 2>&1 \
  | grep -v -E "it/s\]|s/it\]" | tee $OUT/old.log | tail -30
cp /tmp/old/timings.json $OUT/timings_old.json
