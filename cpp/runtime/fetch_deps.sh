#!/usr/bin/env bash
# Fetch header-only build dependencies as Debian packages without touching the system's apt setup:
#   fetch_deps.sh DEST PACKAGE...
# A private sources list (Debian trixie main by default) and private apt state under DEST/apt, the .debs cached in
# DEST/debs, unpacked with `dpkg -x` into DEST/root (so headers land in DEST/root/usr/include). Idempotent: packages
# whose .deb is already cached are not downloaded again. Why trixie: ONNX Runtime's C/C++ headers exist in no PyPI
# wheel and in no Debian 12 package (see ENVIRONMENT.md, "C++").
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: fetch_deps.sh DEST PACKAGE..." >&2
  exit 2
fi
dest=$1
shift
suite=${ADASKIP_DEBIAN_SUITE:-trixie}
mirror=${ADASKIP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
keyring=${ADASKIP_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || { echo "fetch_deps.sh: $tool not found (a Debian-based system is needed)" >&2; exit 1; }
done
[ -r "$keyring" ] || { echo "fetch_deps.sh: no Debian archive keyring at $keyring (set ADASKIP_DEBIAN_KEYRING)" >&2; exit 1; }

mkdir -p "$dest/apt/sources" "$dest/apt/lists/partial" "$dest/apt/cache/archives/partial" "$dest/debs" "$dest/root"
dest=$(cd "$dest" && pwd)

missing=()
for pkg in "$@"; do
  compgen -G "$dest/debs/${pkg}_*.deb" >/dev/null || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
  cat >"$dest/apt/sources/adaskip.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: $suite
Components: main
Signed-By: $keyring
SOURCES
  apt_opts=(-q -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$dest/apt/sources"
            -o "Dir::State::Lists=$dest/apt/lists" -o "Dir::Cache=$dest/apt/cache" -o "Debug::NoLocking=1")
  # apt drops to the _apt user for downloads, which cannot write into a private folder owned by root
  [ "$(id -u)" = 0 ] && apt_opts+=(-o "APT::Sandbox::User=root")
  echo "fetch_deps.sh: downloading ${missing[*]} from Debian $suite ($mirror)"
  apt-get "${apt_opts[@]}" update >"$dest/apt/update.log" 2>&1 || { cat "$dest/apt/update.log" >&2; exit 1; }
  (cd "$dest/debs" && apt-get "${apt_opts[@]}" download "${missing[@]}")
fi

for pkg in "$@"; do
  for deb in "$dest/debs/${pkg}"_*.deb; do
    stamp="$dest/root/.$(basename "$deb").unpacked"
    [ -e "$stamp" ] || { dpkg -x "$deb" "$dest/root" && touch "$stamp"; }
  done
done
