mkdir -p ~/.triton && tar xzf ../.carry_lead/triton_cache.tgz -C ~/.triton 2>/dev/null
ALT='{"out:2":[32,128,8,2],"dv:2":[32,128,8,2]}'
export SEQPAR_GATED_TILES="$ALT"
for v in B C D; do
  rm -rf /tmp/t$v && mkdir -p /tmp/t$v && cp -r kernels seqpar /tmp/t$v/ && cp pyproject.toml /tmp/t$v/ 2>/dev/null
  cp variants/$v/gated.py /tmp/t$v/kernels/seqpar_kernels/triton/gated.py
  (cd /tmp/t$v && PYTHONPATH=/tmp/t$v:/tmp/t$v/kernels python3 -m seqpar_kernels.triton.check --variants gla --quick --json $OUT/check_$v.json > $OUT/check_$v.log 2>&1; echo "check $v rc=$?" >> $OUT/check_$v.log) &
done
wait
for v in B C D; do cat $OUT/check_$v.log; done
for v in B C D; do
  echo "== variant $v"
  (cd /tmp/t$v && PYTHONPATH=/tmp/t$v:/tmp/t$v/kernels python3 -m seqpar.cli bench kernels --variants gla --backends triton --lengths 65536 --profile --output $OUT/gla_$v.json 2>&1 | grep -v -i warn | tee $OUT/bench_$v.log)
done
