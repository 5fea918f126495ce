# GenAI int4/fp32 vs llama.cpp q4_0/q4_k_m vs Optimum fp32: perplexity, decode speed (interleaved rounds)
# and serving under load, for the dense model and the k = 8 point (25 %) of a `build --max-sparsity` run.
#   CURVE=/tmp/curve/b OUT=/tmp/i15 bash benchmarks/genai_vs_llama.sh
set -x
cd "$(dirname "$0")/.."
. .venv/bin/activate
M=${OUT:-/tmp/i15}
D=${DATA:-../shared/data}
date; uptime
python - <<'PY'
from pathlib import Path
from fusedeploy.compress import steps
from fusedeploy.compress.driver import write_output
import os; run = os.environ.get("CURVE", "/tmp/curve/b") + "/compress/model"
m, t = steps.rebuild(run, 8)
write_output(m, t, steps.step_report(run, 8), Path(os.environ.get("OUT", "/tmp/i15")) / "fg25")
PY
for v in dense fg25; do
  src=$([ $v = dense ] && echo smollm2-135m || echo $M/fg25)
  fusedeploy export onnx --model $src --out $M/$v-genai-int4 --precision int4
  fusedeploy export onnx --model $src --out $M/$v-genai-fp32
  fusedeploy export onnx --model $src --out $M/$v-optimum-fp32 --engine optimum
  fusedeploy export gguf --model $src --out $M/$v-q4_0.gguf --type q4_0
  fusedeploy export gguf --model $src --out $M/$v-q4_k_m.gguf --type q4_k_m
done
date; uptime
for a in genai-int4 genai-fp32 optimum-fp32; do for v in dense fg25; do for set in wikitext-2 ptb; do
  echo "PPL $v-$a $set"; fusedeploy eval --model $M/$v-$a --data $D/$set/test.txt --ctx 512 --max-windows 20 --json
done; done; done
for a in q4_0 q4_k_m; do for v in dense fg25; do for set in wikitext-2 ptb; do
  echo "PPL $v-$a $set"; fusedeploy eval --model $M/$v-$a.gguf --runtime llama.cpp --data $D/$set/test.txt --ctx 512 --max-windows 20 --json
done; done; done
date; uptime
ARGS=""
for v in dense fg25; do ARGS="$ARGS --artifact $v-genai-int4=$M/$v-genai-int4 --artifact $v-q4_0=$M/$v-q4_0.gguf --artifact $v-q4_k_m=$M/$v-q4_k_m.gguf --artifact $v-genai-fp32=$M/$v-genai-fp32 --artifact $v-optimum-fp32=$M/$v-optimum-fp32"; done
python benchmarks/runtime_speed.py --rounds 3 $ARGS --out-json $M/speed.json
date; uptime
for a in fg25-genai-int4 fg25-q4_0.gguf; do
  fusedeploy serve $M/$a --port 8811 > $M/serve-$a.log 2>&1 &
  SP=$!
  for i in $(seq 60); do curl -sf http://127.0.0.1:8811/health >/dev/null && break; sleep 1; done
  uptime
  fusedeploy bench-serve http://127.0.0.1:8811 --concurrency 1,4,16 --duration 20 --max-tokens 32 --json > $M/bench-$a.json
  uptime
  kill $SP; wait $SP
done
date; uptime
