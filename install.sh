#!/usr/bin/env bash
# Installs cnnviz and what it needs: Graphviz's `dot` (system package, for architecture.png)
# and the Python package with its test tools and the export runtimes. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
  else
    echo "install.sh: Graphviz not found and not installable here (needs apt-get as root);" \
         "install it with your package manager (brew install graphviz, conda install graphviz)." \
         "Everything but architecture.png works without it." >&2
  fi
fi
python3 -m pip install --quiet --disable-pip-version-check -e ".[test,export]"
