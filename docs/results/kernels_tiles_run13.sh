# run 13 drivers: tiles.sh LIST compiles each candidate at 4K in parallel, then times each alone at 64K
# (run 13a used the same loop with the gla candidates inline; 13c/13e/13d ran check --quick first)
# usage: tiles.sh LIST  -- LIST lines "name|variants|SEQPAR_GATED_TILES json". Compiles every line in
# parallel at 4K, then times each alone at 64K with the profiler split (triton only).
set -u
START=$(date +%s); left() { echo $(( ${DEADLINE:-580} - ($(date +%s) - START) )); }
R=$OUT/r/tiles; mkdir -p $R
mapfile -t LINES < "$1"
B="python3 -m seqpar.cli bench kernels --backends triton"
for l in "${LINES[@]}"; do
  IFS='|' read -r name vars json <<< "$l"
  (SEQPAR_GATED_TILES="$json" timeout 240 $B --variants $vars --lengths 4096 --rep-ms 10 --output $R/warm_$name.json > $R/warm_$name.log 2>&1; echo "rc=$?" >> $R/warm_$name.log) &
done
wait
echo "warm done at $(( $(date +%s) - START )) s"
for l in "${LINES[@]}"; do
  IFS='|' read -r name vars json <<< "$l"
  [ "$(left)" -gt 40 ] || { echo "skip $name (time)"; continue; }
  echo "== $name $vars $json"
  SEQPAR_GATED_TILES="$json" timeout 90 $B --variants $vars --lengths 65536 --rep-ms 150 --profile --output $R/t_$name.json 2>&1 | grep -v -i warn | grep "triton \|64K" | sort -u
done

# LISTS (name|variants|SEQPAR_GATED_TILES)
## tiles2
# base|linear_attn simple_gla gla|{}
# dqk64x64w4|linear_attn simple_gla|{"dqk:0":[64,64,4,2],"dqk:1":[64,64,4,2]}
# dqk64x128w8|linear_attn simple_gla|{"dqk:0":[64,128,8,2],"dqk:1":[64,128,8,2]}
# dqk64x64s3|linear_attn simple_gla|{"dqk:0":[64,64,8,3],"dqk:1":[64,64,8,3]}
# out64x128w4|linear_attn simple_gla|{"out:0":[64,128,4,2],"dv:0":[64,128,4,2],"out:1":[64,128,4,2],"dv:1":[64,128,4,2]}
# out64x64w4|linear_attn simple_gla|{"out:0":[64,64,4,2],"dv:0":[64,64,4,2],"out:1":[64,64,4,2],"dv:1":[64,64,4,2]}
# out128x64w8|linear_attn simple_gla|{"out:0":[128,64,8,2],"dv:0":[128,64,8,2],"out:1":[128,64,8,2],"dv:1":[128,64,8,2]}
# st64x128|linear_attn simple_gla|{"state:0":[64,128,4,3],"state:1":[64,128,4,3]}
# st64x64s4|linear_attn simple_gla|{"state:0":[64,64,4,4],"state:1":[64,64,4,4]}
# st32x128|linear_attn simple_gla|{"state:0":[32,128,4,3],"state:1":[32,128,4,3]}
# gout32x128w4|gla|{"out:2":[32,128,4,2],"dv:2":[32,128,4,2]}
# gout32x128w4s3|gla|{"out:2":[32,128,4,3],"dv:2":[32,128,4,3]}
# gout64x128w4|gla|{"out:2":[64,128,4,2],"dv:2":[64,128,4,2]}
# gout32x64w4|gla|{"out:2":[32,64,4,2],"dv:2":[32,64,4,2]}
## tiles3
# old|linear_attn simple_gla gla|{"dqk:0":[64,64,8,2],"dqk:1":[64,64,8,2],"out:2":[32,128,8,2],"dv:2":[32,128,8,2]}
# new|linear_attn simple_gla gla|{}
# dqk4w3s|linear_attn simple_gla|{"dqk:0":[64,64,4,3],"dqk:1":[64,64,4,3]}
# gout4s|gla|{"out:2":[32,128,4,4],"dv:2":[32,128,4,4]}
## tiles4
# old|linear_attn simple_gla gla|{"dqk:0":[64,64,8,2],"dqk:1":[64,64,8,2],"out:2":[32,128,8,2],"dv:2":[32,128,8,2]}
# new|linear_attn simple_gla gla|{}
## tiles5 (run 13i)
# base|gla|{}
# k16w4|gla|{"dqk:2":[16,64,4,2]}
# k16w8|gla|{"dqk:2":[16,64,8,2]}
# k16v128w4|gla|{"dqk:2":[16,128,4,2]}
# k16w4s3|gla|{"dqk:2":[16,64,4,3]}
# k32v32w8|gla|{"dqk:2":[32,32,8,2]}
# k32v32w4|gla|{"dqk:2":[32,32,4,2]}
# k32v128w8|gla|{"dqk:2":[32,128,8,1]}
