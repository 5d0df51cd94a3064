#!/usr/bin/env bash
# Lays out what a GPU call of the workplace's device tool needs, in the ignored folders .device/ and .whl/ (run from
# the repository root, with .venv installed). Then: run `bash .device/run_all.sh` with carry [".device", ".whl"]
# (LIMIT=seconds bounds it), then `bash .device/run_compare.sh`: forced 120 against 09bc105 on the same card.
# The device has torch and transformers but not openai/pydantic/peft/pytest: their wheels travel (cp312), and only
# the missing ones are installed there (install_missing.py). The tokenizer travels gzipped (33 MB -> 5 MB).
set -euo pipefail
mkdir -p .device/data .device/tokenizer .whl
cp ../shared/data/*.json .device/data/
cp bench/device/*.sh bench/device/install_missing.py .device/
.venv/bin/python -c "from ao_resampling.engine.loading.models import load_tokenizer as t; t('gemma3-270m-gguf').save_pretrained('.device/tokenizer')"
gzip -f -9 .device/tokenizer/tokenizer.json
[ -d .device/oldmain ] || { mkdir -p .device/oldmain && git archive 09bc105 | tar -x -C .device/oldmain; }
for p in openai httpx2 httpcore2 truststore h11 anyio idna certifi jiter distro sniffio pydantic pydantic-core \
         annotated-types typing-inspection typing-extensions pytest pluggy iniconfig pytest-timeout peft typer click \
         shellingham rich markdown-it-py mdurl pygments tqdm matplotlib cycler kiwisolver contourpy pyparsing fonttools; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p"
done
du -sh .device .whl  # together under the 64 MiB a call carries
