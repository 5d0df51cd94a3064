# sourced by every device script: wheels, tokenizer, data, the stand-in's environment
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
[ -n "$SKIP_INSTALL" ] || python3 .device/install_missing.py > $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
[ -f .device/tokenizer/tokenizer.json ] || gunzip -k .device/tokenizer/tokenizer.json.gz
mkdir -p ../shared && cp -r .device/data ../shared/ 2>/dev/null
export AO_MODEL=${AO_MODEL:-synthetic:gemma-3-27b} AO_LORA=random AO_TOKENIZER=$PWD/.device/tokenizer \
  AO_TARGETS=$PWD/.device/data/target_model_queries.json AO_QUESTIONS=$PWD/.device/data/sycophancy_questions.json \
  AO_JUDGE=loopback AO_EMBEDDING_MODEL=none
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/card.txt
python3 -c "import torch, transformers, peft, openai, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'openai', openai.__version__, 'pydantic', pydantic.__version__)" | tee -a $OUT/card.txt
# every measurement starts from an empty run folder: a machine kept warm between calls keeps /tmp, and a run folder
# left there would be resumed (nothing left to sample, nothing measured)
rm -rf /tmp/real /tmp/real[0-9]* /tmp/new /tmp/old /tmp/sweep
