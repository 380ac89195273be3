#!/usr/bin/env bash
# The grader's sandbox tool (exercises/sandbox.py): Debian's bubblewrap, installed only when missing.
# Where it cannot be installed (no root and no password-less sudo, no apt-get) it says so and exits 0:
# the grader then refuses to grade for credit without --no-sandbox, and its sandbox tests fail with that
# reason. Under CI (CI=true) a missing bwrap is an error here already.
set -euo pipefail

command -v bwrap > /dev/null && exit 0
missing() {
  echo "grader sandbox: $1 (see README, 'Which tests need what')"
  if [[ ${CI:-} == true ]]; then exit 1; fi
  exit 0
}
if [[ $(id -u) -eq 0 ]]; then sudo=()
elif command -v sudo > /dev/null && sudo -n true 2> /dev/null; then sudo=(sudo -n)
else missing "bwrap is missing and installing Debian's bubblewrap needs root or password-less sudo"; fi
command -v apt-get > /dev/null || missing "bwrap is missing and there is no apt-get to install Debian's bubblewrap"
echo "grader sandbox: installing Debian's bubblewrap"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends bubblewrap
