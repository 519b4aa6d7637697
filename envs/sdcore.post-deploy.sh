#!/usr/bin/env bash
# Snakemake runs this inside a newly created sdcore environment, from its working directory
# (the repository): the environment already has every dependency, so only sdcore is added.
set -euo pipefail
if [ ! -f pyproject.toml ] || [ ! -d sdcore ]; then
    echo "run Snakemake from the repository root so that sdcore can be installed" >&2
    exit 1
fi
pip install --no-deps -e .
