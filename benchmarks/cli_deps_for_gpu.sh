#!/usr/bin/env bash
# The CLI's parser for the GPU image, which lacks jsonargparse and cannot download: jsonargparse with its
# "signatures" extra (docstring-parser, typeshed-client), installed here into .whl/cli_site with their metadata,
# which Lightning's requirement check reads (about 8 MB). Then on the GPU (device tool: carry [".whl"]):
#   PYTHONPATH=$PWD:$PWD/.whl/cli_site bash benchmarks/gpu_fsdp.sh tests
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl/cli_site
pip install -q --no-deps --target .whl/cli_site "jsonargparse==$(python -c 'import jsonargparse; print(jsonargparse.__version__)')" \
    docstring-parser typeshed-client
du -sh .whl/cli_site
