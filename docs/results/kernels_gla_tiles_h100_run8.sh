# gla (per-key gate) launch tiles at 64K: each candidate GPU-checked (check --smoke, the benchmark's
# specialisation) in parallel, then timed one at a time (bench kernels, triton only).
# Run 8 ran it twice: first with 14 candidates (also dq/dk 64x64, 32x128, 32x64 at 3 stages and at 4 warps;
# state 32x32), whose 14 processes at once ran the GPU out of memory; then with the list below.
CANDS=(
'{}'
'{"intra:2":[32,64,8,2]}'
'{"intra:2":[32,64,4,3]}'
'{"intra:2":[64,64,4,2]}'
'{"intra:2":[32,32,4,2]}'
'{"state:2":[64,64,4,3]}'
'{"state:2":[32,128,4,3]}'
'{"out:2":[64,128,8,2],"dv:2":[64,128,8,2]}'
'{"out:2":[32,64,4,2],"dv:2":[32,64,4,2]}'
)
mkdir -p $OUT/r/tiles
for i in "${!CANDS[@]}"; do
  (SEQPAR_GATED_TILES="${CANDS[$i]}" timeout 200 python3 -m seqpar_kernels.triton.check --smoke --variants gla \
     --json $OUT/r/tiles/check_$i.json > $OUT/r/tiles/check_$i.log 2>&1; echo "rc=$?" >> $OUT/r/tiles/check_$i.log) &
done
wait
for i in "${!CANDS[@]}"; do echo "== $i ${CANDS[$i]}"; tail -2 $OUT/r/tiles/check_$i.log; done
for i in "${!CANDS[@]}"; do
  grep -q "^PASS" $OUT/r/tiles/check_$i.log || continue
  echo "== time $i ${CANDS[$i]}"
  SEQPAR_GATED_TILES="${CANDS[$i]}" timeout 60 python3 -m seqpar.cli bench kernels --variants gla --backends triton \
     --lengths 65536 --rep-ms 150 --profile --output $OUT/r/tiles/bench_$i.json 2>&1 | grep -v -i warn | grep -v "^variant\|^times\|^wrote\|^$"
done
