# call 1: the -m gpu tests at defaults (issues 22, 23, 25), then the decode step's kernels alone; each step bounded so the call ends inside LIMIT seconds
START=$SECONDS; LIMIT=${LIMIT:-565}
left() { echo $(( LIMIT - (SECONDS - START) )); }
quiet() { tr '\r' '\n' | grep -v -E "it/s\]|s/it\]|sample/s\]|call/s\]"; }
source .device/setup.sh || exit 1
echo "== graphs"; timeout $(left) python3 -m pytest -m gpu -p no:cacheprovider -x -q tests/experiments/test_cuda_graphs.py 2>&1 | tee $OUT/graphs.log | tail -4
echo "== real-length experiment, defaults (left $(left) s)"
AO_ANSWER_LENGTHS=$PWD/.device/data/ao_answer_lengths.json AO_OUT=/tmp/real timeout $(left) python3 -m pytest -m gpu -p no:cacheprovider -x -q -s \
  tests/experiments/test_full_experiment.py 2>&1 | quiet | tee $OUT/full_real.log | tail -12
cp /tmp/real/timings.json $OUT/timings_real.json 2>/dev/null
echo "== sweep, 20 targets, real lengths (left $(left) s)"
[ $(left) -gt 100 ] && AO_NUM_TARGETS=20 AO_ANSWER_LENGTHS=$PWD/.device/data/ao_answer_lengths.json AO_OUT=/tmp/sweep timeout $(( $(left) - 5 )) \
  python3 -m pytest -m gpu -p no:cacheprovider -x -q -s tests/experiments/test_sweep_experiment.py 2>&1 | quiet | tee $OUT/sweep.log | tail -12
echo "== kernels: attention and RMSNorm (HF's, F.rms_norm, the Triton kernel) at 272 rows (left $(left) s)"
[ $(left) -gt 40 ] && timeout $(( $(left) - 5 )) python3 bench/bench_kernels.py --rows 272 --cut 96 2>&1 | tee $OUT/kernels.log | tail -14
echo "== done at $((SECONDS - START)) s"
