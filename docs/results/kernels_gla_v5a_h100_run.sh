set -x
mkdir -p ~/.triton && tar xzf ../.carry_lead/triton_cache.tgz -C ~/.triton 2>/dev/null
export PYTHONPATH=$PWD:$PWD/kernels
ALT='{"out:2":[32,128,8,2],"dv:2":[32,128,8,2]}'
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m seqpar_kernels.triton.check --variants gla --quick --json $OUT/check_gla.json > $OUT/check_gla.log 2>&1 &
P1=$!
SEQPAR_GATED_TILES="$ALT" python3 -m seqpar_kernels.triton.check --variants gla --quick --json $OUT/check_gla_alt.json > $OUT/check_gla_alt.log 2>&1 &
P2=$!
wait $P1; echo "check rc=$?"; wait $P2; echo "check alt rc=$?"
cat $OUT/check_gla.log $OUT/check_gla_alt.log
python3 -m seqpar.cli bench kernels --variants gla --backends triton --lengths 65536 262144 --profile --output $OUT/gla.json 2>&1 | grep -v Warn | tee $OUT/bench.log
SEQPAR_GATED_TILES="$ALT" python3 -m seqpar.cli bench kernels --variants gla --backends triton --lengths 65536 --profile --output $OUT/gla_alt.json 2>&1 | grep -v Warn | tee $OUT/bench_alt.log
