#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html (open docs/_build/html/index.html).
# Needs the docs extra: pip install -e ".[docs]". Warnings are errors (-W) and every
# cross-reference must resolve (-n); --keep-going reports all of them at once.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m sphinx -W -n --keep-going -b html docs docs/_build/html "$@"
