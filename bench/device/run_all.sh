# one call, in order of what the open issues need; each step bounded so the call ends inside its limit
START=$SECONDS; LIMIT=${LIMIT:-565}
left() { echo $(( LIMIT - (SECONDS - START) )); }
source .device/setup.sh || exit 1
echo "== graphs"; timeout $(left) python3 -m pytest -m gpu -p no:cacheprovider -x -q tests/experiments/test_cuda_graphs.py 2>&1 | tee $OUT/graphs.log | tail -4
echo "== real-length experiment, defaults (left $(left) s)"
AO_ANSWER_LENGTHS=$PWD/.device/data/ao_answer_lengths.json AO_OUT=/tmp/real timeout $(left) python3 -m pytest -m gpu -p no:cacheprovider -x -q -s \
  tests/experiments/test_full_experiment.py 2>&1 | tr '\r' '\n' | grep -v -E "it/s\]|s/it\]|sample/s\]|call/s\]" | tee $OUT/full_real.log | tail -25
cp /tmp/real/timings.json $OUT/timings_real.json 2>/dev/null
echo "== forced 120 bench + checks (left $(left) s)"
[ $(left) -gt 120 ] && timeout $(( $(left) - 5 )) python3 bench/bench_generation.py --model $AO_MODEL --tokenizer $AO_TOKENIZER --targets $AO_TARGETS \
  --questions $AO_QUESTIONS --check 4 --noise 4 --sequential-samples 2 --json $OUT/forced.json 2>&1 | tr '\r' '\n' \
  | grep -v -E "it/s\]|s/it\]|sample/s\]" | tee $OUT/forced.log | tail -50
echo "== done at $((SECONDS - START)) s"
