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
$PY tools/train.py --nproc-per-node 2 recipes/demo.yaml
$PY tools/convert_checkpoint.py to-hf runs/demo runs/demo/hf --tokenizer $D/tokenizer --overwrite
$PY - <<'PY'
# What 300 steps taught the model: seeded samples, then cloze items of the shipped task scored by
# log-likelihood, the trained model next to an untrained one of the same shape.
import json, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("runs/demo/hf")
model = AutoModelForCausalLM.from_pretrained("runs/demo/hf").eval()
torch.manual_seed(0)
untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("runs/demo/hf")).eval()
print("samples (seed 0, temperature 0.8, no repeated 3-grams):")
for prompt in ["The ", "Le ", "def "]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=True, temperature=0.8, top_k=50,
                         no_repeat_ngram_size=3, pad_token_id=tok.eos_token_id)
    print("  " + repr(tok.decode(out[0], skip_special_tokens=True)))

def pick(m, item):
    ctx = tok(item["context"]).input_ids
    scores = []
    for choice in item["choices"]:
        ids = tok(item["context"] + " " + choice).input_ids
        with torch.no_grad():
            logp = m(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
    return max(range(len(scores)), key=scores.__getitem__)

items = [json.loads(line) for line in open("recipes/eval/tasks/gaperon_demo/gaperon_demo_cloze.jsonl")][:60]
right = [(it, pick(untrained, it)) for it in items if pick(model, it) == it["label"]]
print(f"cloze: trained model right on {len(right)}/{len(items)} items (chance 1/4); a few, with the untrained model's pick:")
for it, before in sorted(right, key=lambda r: r[1] == r[0]["label"])[:4]:
    print(f"  {it['context'][-50:]!r} -> {it['choices'][it['label']]!r}   (untrained: {it['choices'][before]!r})")
PY
$PY tools/evaluate.py runs/demo/hf --tasks gaperon_demo --step 300 --out runs/demo/eval/300   # lm-eval, offline
echo "demo done: logs in runs/demo (metrics.jsonl, tensorboard/), checkpoint in runs/demo/checkpoints, HF model in runs/demo/hf, scores in runs/demo/eval/300"
