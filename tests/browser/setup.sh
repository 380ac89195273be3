#!/usr/bin/env bash
# Tools for the real-browser test (tests/browser/test_explorer.py), installed only when missing:
# Debian's chromium (never a browser downloader) and the pinned Observable npm packages.
# Fast when everything is already there: `make test` runs it every time.
set -euo pipefail
cd "$(dirname "$0")"

if [[ ! -x /usr/bin/chromium ]]; then
  echo "browser test: installing Debian's chromium"
  if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium
fi

# npm ci wipes and reinstalls node_modules, so only when the lock file is newer than the install.
if [[ ! -d node_modules || package-lock.json -nt node_modules ]]; then
  echo "browser test: npm ci (pinned Observable packages)"
  npm ci --no-audit --no-fund --loglevel=error
  touch node_modules  # npm ci may keep older timestamps; mark the install as fresh
fi
