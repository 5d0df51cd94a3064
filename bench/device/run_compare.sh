# call 2, in this order (the cheap and the wanted first, when device time is short): REAL=n: the real-length
# experiment at defaults n times; ROWS=1: bench_rows.py; the bench's checks (greedy through refills against HF
# generate, merged/unmerged noise, the sequential ratio); PROFILE=1: profile_stage.py; then forced 120 tokens, this
# tree against 09bc105 (before issue 23) in the same call on the same card
START=$SECONDS; LIMIT=${LIMIT:-565}; N=${N:-30}
left() { echo $(( LIMIT - (SECONDS - START) )); }
quiet() { tr '\r' '\n' | grep -v -E "it/s\]|s/it\]|sample/s\]|call/s\]"; }
source .device/setup.sh || exit 1
for i in $(seq 1 ${REAL:-0}); do  # REAL=n: first the real-length experiment at defaults, n times (the 2nd with
  # Triton's kernel cache warm, as on a machine that ran the tool before), each in a process and folder of its own
  echo "== real-length experiment, defaults, run $i (left $(left) s)"
  AO_ANSWER_LENGTHS=$PWD/.device/data/ao_answer_lengths.json AO_OUT=/tmp/real$i timeout $(left) python3 -m pytest -m gpu \
    -p no:cacheprovider -x -q -s tests/experiments/test_full_experiment.py 2>&1 | quiet | tee $OUT/full_real$i.log | tail -5
  cp /tmp/real$i/timings.json $OUT/timings_real$i.json 2>/dev/null
done
if [ -n "$ROWS" ]; then  # ROWS=1: the step's matmuls at each row count (which counts fill the card's tiles)
  echo "== matmuls by rows (left $(left) s)"
  timeout $(left) python3 bench/bench_rows.py --json $OUT/rows.json 2>&1 | tail -40
fi
echo "== bench checks (left $(left) s)"
[ $(left) -gt 45 ] && timeout $(( $(left) - 5 )) python3 bench/bench_generation.py --model $AO_MODEL --tokenizer $AO_TOKENIZER \
  --targets $AO_TARGETS --questions $AO_QUESTIONS ${CHECKS:---num-targets 10 --check 4 --noise 4 --sequential-samples 2} \
  --json $OUT/checks.json 2>&1 | quiet | tail -40
if [ -n "$PROFILE" ]; then  # PROFILE=1: where a real-length stage's time goes (phases, kernels), LoRA merged once
  echo "== profile, real lengths, 20 targets (left $(left) s)"
  timeout $(left) python3 bench/profile_stage.py --model $AO_MODEL --tokenizer $AO_TOKENIZER --targets $AO_TARGETS \
    --questions $AO_QUESTIONS --answer-lengths .device/data/ao_answer_lengths.json --num-targets 20 \
    --refill-fractions ${FRACTIONS:-8,16} --profile-targets 2 --json $OUT/profile.json 2>&1 | quiet | tail -60
fi
echo "== this tree, forced 120, $N targets, rows auto (left $(left) s)"
AO_NUM_TARGETS=$N AO_OUT=/tmp/new timeout $(left) python3 -m pytest -m gpu -p no:cacheprovider -x -q -s tests/experiments/test_full_experiment.py \
  2>&1 | quiet | tee $OUT/new_forced.log | tail -6
cp /tmp/new/timings.json $OUT/timings_new_forced.json 2>/dev/null
# 09bc105's default of 768 rows runs out of memory on an 80 GB card (256 rows there); a card of more memory runs
# its default
CARD_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
OLD_ROWS=${OLD_ROWS:-$([ "${CARD_MIB:-0}" -gt 100000 ] && echo 768 || echo 256)}
echo "== 09bc105, forced 120, $N targets, $OLD_ROWS rows (left $(left) s)"
(cd .device/oldmain && PYTHONPATH=/tmp/site:$PWD AO_NUM_TARGETS=$N AO_BATCH_ROWS=$OLD_ROWS AO_OUT=/tmp/old timeout $(left) python3 -m pytest -m gpu \
  -p no:cacheprovider -x -q -s tests/experiments/test_full_experiment.py 2>&1 | quiet | tee $OUT/old_forced.log | tail -6)
cp /tmp/old/timings.json $OUT/timings_old_forced.json 2>/dev/null
echo "== done at $((SECONDS - START)) s"
