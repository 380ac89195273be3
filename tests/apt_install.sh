# Sourced by tests/sandbox_setup.sh and tests/browser/setup.sh: `apt_install LABEL PACKAGE` installs one
# Debian package as root or with password-less sudo (never a password prompt in the middle of
# `make test`). When it cannot, it returns 1 with the reason in $apt_missing, and the caller decides
# whether that skips a test or fails the setup.
apt_install() {
  local label=$1 package=$2
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then sudo=(sudo -n)
    else apt_missing="installing Debian's $package needs root or password-less sudo"; return 1; fi
  fi
  if ! command -v apt-get > /dev/null; then
    apt_missing="there is no apt-get to install Debian's $package"; return 1
  fi
  echo "$label: installing Debian's $package"
  # Called as a condition, so `set -e` does not apply in here: each failure is named.
  "${sudo[@]}" apt-get update -qq || { apt_missing="apt-get update failed"; return 1; }
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$package" \
    || { apt_missing="apt-get could not install Debian's $package"; return 1; }
}
