#!/usr/bin/env bash
# Tools for the real-browser test (tests/browser/test_explorer.py), installed only when missing:
# Debian's chromium (never a browser downloader) and the pinned Observable npm packages.
# Fast when everything is already there: `make test` runs it every time.
# Where they cannot be installed (no root and no password-less sudo, no apt-get, no npm) it says
# so and exits 0: `make test` still runs every other test and pytest reports the browser test
# as skipped with the reason. Under CI (CI=true) that skip is a failure instead.
set -euo pipefail
cd "$(dirname "$0")"

skip() { echo "browser test: $1; it will be skipped (see README, 'Which tests need what')"; exit 0; }

chromium=${CHROMIUM:-/usr/bin/chromium}  # the path test_explorer.py launches; overridable for tests
if [[ ! -x $chromium ]]; then
  source ../apt_install.sh
  apt_install "browser test" chromium || skip "chromium is missing and $apt_missing"
fi

command -v npm > /dev/null || skip "npm is missing (it comes with Node.js)"
# npm ci wipes and reinstalls node_modules, so only when the lock file is newer than the install.
if [[ ! -d node_modules || package-lock.json -nt node_modules ]]; then
  echo "browser test: npm ci (pinned Observable packages)"
  npm ci --no-audit --no-fund --loglevel=error
  touch node_modules  # npm ci may keep older timestamps; mark the install as fresh
fi
