#!/usr/bin/env bash
# System packages the tests use, installed with apt-get when missing (and apt-get can run):
#   java      (default-jre-headless)  COCO captioning scorers: PTB tokenizer, METEOR, SPICE
#   g++, ninja (g++, ninja-build)     DeepSpeed compiles a small C++ communication op on first use
#   chromium                          the browser tests of `coca serve`'s page (driven by Playwright)
# A package that cannot be installed is an error (exit 1), unless COCA_ALLOW_MISSING_SYSTEM_PACKAGES=1:
# then the tests that need it skip, except under CI=true, where they fail (tests/conftest.py).
set -u
need=()
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v ninja >/dev/null 2>&1 || need+=(ninja-build)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  echo "installing ${need[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO mkdir -p /usr/share/man/man1  # openjdk's post-install script needs it on slim images
  if $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
     || { $SUDO apt-get update -q >/dev/null 2>&1 \
          && $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1; }; then
    exit 0
  fi
fi
echo "error: could not install ${need[*]} (no apt-get, no root, or apt-get failed). Without them the Java" \
     "caption metrics, the DeepSpeed tests (C++ compiler, ninja) and the browser tests (chromium) cannot run." \
     "Install them, or set COCA_ALLOW_MISSING_SYSTEM_PACKAGES=1 to run the rest (those tests then skip;" \
     "under CI=true they fail)." >&2
[ "${COCA_ALLOW_MISSING_SYSTEM_PACKAGES:-0}" = "1" ] && exit 0
exit 1
