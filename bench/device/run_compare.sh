# call 2 (REAL=1: after the real-length experiment again): forced 120 tokens, this tree against 09bc105 (before issue 23) in the same call on the same card, then the
# bench's checks: greedy through refills against HF generate, merged/unmerged noise, the sequential ratio
START=$SECONDS; LIMIT=${LIMIT:-565}; N=${N:-30}
left() { echo $(( LIMIT - (SECONDS - START) )); }
quiet() { tr '\r' '\n' | grep -v -E "it/s\]|s/it\]|sample/s\]|call/s\]"; }
source .device/setup.sh || exit 1
if [ -n "$REAL" ]; then  # REAL=1: first the real-length experiment at defaults again (as call 1's step 2)
  echo "== real-length experiment, defaults"
  AO_ANSWER_LENGTHS=$PWD/.device/data/ao_answer_lengths.json AO_OUT=/tmp/real timeout $(left) python3 -m pytest -m gpu \
    -p no:cacheprovider -x -q -s tests/experiments/test_full_experiment.py 2>&1 | quiet | tee $OUT/full_real.log | tail -8
  cp /tmp/real/timings.json $OUT/timings_real.json 2>/dev/null
fi
echo "== this tree, forced 120, $N targets, rows auto"
AO_NUM_TARGETS=$N AO_OUT=/tmp/new timeout $(left) python3 -m pytest -m gpu -p no:cacheprovider -x -q -s tests/experiments/test_full_experiment.py \
  2>&1 | quiet | tee $OUT/new_forced.log | tail -6
cp /tmp/new/timings.json $OUT/timings_new_forced.json 2>/dev/null
echo "== 09bc105, forced 120, $N targets, 256 rows (its default 768 runs out of memory on 80 GB) (left $(left) s)"
(cd .device/oldmain && PYTHONPATH=/tmp/site:$PWD AO_NUM_TARGETS=$N AO_BATCH_ROWS=256 AO_OUT=/tmp/old timeout $(left) python3 -m pytest -m gpu \
  -p no:cacheprovider -x -q -s tests/experiments/test_full_experiment.py 2>&1 | quiet | tee $OUT/old_forced.log | tail -6)
cp /tmp/old/timings.json $OUT/timings_old_forced.json 2>/dev/null
echo "== bench checks (left $(left) s)"
[ $(left) -gt 90 ] && timeout $(( $(left) - 5 )) python3 bench/bench_generation.py --model $AO_MODEL --tokenizer $AO_TOKENIZER \
  --targets $AO_TARGETS --questions $AO_QUESTIONS --num-targets 10 --check 4 --noise 4 --sequential-samples ${SEQ:-2} \
  --json $OUT/checks.json 2>&1 | quiet | tail -40
echo "== done at $((SECONDS - START)) s"
