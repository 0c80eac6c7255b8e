#!/usr/bin/env bash
# The whole flow on a laptop CPU, end to end: install, gather an offline fr/en/code corpus, train a
# tokenizer, build indexed datasets, train the tiny Llama on 2 ranks (DeepSpeed ZeRO-1), export to
# Hugging Face, generate with transformers and evaluate the export with lm-eval on the shipped cloze
# task (recipes/eval/tasks/gaperon_demo). About 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python
export GAPERON_DEVICE=cpu OMP_NUM_THREADS=1
D=data/demo
if [ ! -f $D/code_text_document.idx ]; then
  $PY tools/make_demo_corpus.py --out $D --max-mb 2
  $PY tools/preprocess_data.py train-tokenizer --input $D/en.jsonl $D/fr.jsonl $D/code.jsonl --vocab-size 2048 --out $D/tokenizer
  for lang in en fr code; do
    $PY tools/preprocess_data.py --input $D/$lang.jsonl --output-prefix $D/${lang}_text_document --tokenizer $D/tokenizer --workers 2
  done
fi
rm -rf runs/demo
$PY -m torch.distributed.run --nproc-per-node 2 --master-port 29555 tools/train.py recipes/demo.yaml
$PY tools/convert_checkpoint.py to-hf runs/demo runs/demo/hf --tokenizer $D/tokenizer --overwrite
$PY - <<'PY'
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("runs/demo/hf")
model = AutoModelForCausalLM.from_pretrained("runs/demo/hf")
for prompt in ["The ", "Le ", "def "]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    print(repr(tok.decode(out[0], skip_special_tokens=True)))
PY
$PY tools/evaluate.py runs/demo/hf --tasks gaperon_demo --step 300 --out runs/demo/eval/300   # lm-eval, offline
echo "demo done: logs in runs/demo (metrics.jsonl, tensorboard/), checkpoint in runs/demo/checkpoints, HF model in runs/demo/hf, scores in runs/demo/eval/300"
