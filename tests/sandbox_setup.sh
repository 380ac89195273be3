#!/usr/bin/env bash
# The grader's sandbox tool (exercises/sandbox.py): Debian's bubblewrap, installed only when missing.
# Where it cannot be installed (no root and no password-less sudo, no apt-get) it says so and exits 0:
# the grader then refuses to grade for credit without --no-sandbox, and its sandbox tests fail with that
# reason. Under CI (CI=true) a missing bwrap is an error here already.
set -euo pipefail

command -v bwrap > /dev/null && exit 0
source "$(dirname "$0")/apt_install.sh"
if ! apt_install "grader sandbox" bubblewrap; then
  echo "grader sandbox: bwrap is missing and $apt_missing (see README, 'Which tests need what')"
  if [[ ${CI:-} == true ]]; then exit 1; fi
fi
