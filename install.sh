#!/usr/bin/env bash
# Installs cnnviz and what it needs: Graphviz's `dot` (system package, for architecture.png)
# and the Python package with TensorFlow, its test tools, the export runtimes and the JAX and
# PyTorch backends (CPU wheels). Safe to run again. (Without TensorFlow, on a JAX or PyTorch
# machine: `pip install -e '.[jax]'` or `'.[torch]'`; README "Keras backends".)
#
# Python packages are installed at the exact versions in constraints.txt, the ones the test suite
# passed with. `./install.sh --latest` (or CNNVIZ_LATEST=1) installs the newest releases that
# pyproject.toml allows instead. It installs into whatever `python3` is first on PATH: activate a
# virtual environment first to keep cnnviz apart (`python3 -m venv .venv && . .venv/bin/activate`).
set -euo pipefail
cd "$(dirname "$0")"
latest="${CNNVIZ_LATEST:-}"
for argument in "$@"; do
  case "$argument" in
    --latest) latest=1 ;;
    *) echo "install.sh: unknown option $argument (allowed: --latest)" >&2; exit 2 ;;
  esac
done
if ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
  else
    echo "install.sh: Graphviz not found and not installable here (needs apt-get as root);" \
         "install it with your package manager (brew install graphviz, conda install graphviz)." \
         "Everything but architecture.png works without it." >&2
  fi
fi
pins=(-c constraints.txt)
if [ -n "$latest" ]; then
  pins=(--upgrade --upgrade-strategy eager)
fi
python3 -m pip install --quiet --disable-pip-version-check "${pins[@]}" -e ".[tensorflow,test,export,jax,torch]"
