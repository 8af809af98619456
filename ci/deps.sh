#!/usr/bin/env bash
# Install the Debian packages given as arguments if any is missing (needs root).
set -euo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
# The kernel image and its headers go together: installing linux-headers-amd64 alone
# pulls the newest headers while /boot keeps an older kernel, and a module built against
# them would not load in the kernel the VM tests boot.  apt-get install upgrades the
# one already installed to the same release.
for p in "${missing[@]}"; do
  case "$p" in
    linux-headers-amd64) [[ " $* " == *" linux-image-amd64 "* ]] && missing+=(linux-image-amd64) ;;
    linux-image-amd64) [[ " $* " == *" linux-headers-amd64 "* ]] && missing+=(linux-headers-amd64) ;;
  esac
done
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing Debian packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing packages ${missing[*]}; run as root or install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
