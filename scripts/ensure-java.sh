#!/usr/bin/env bash
# A Java runtime for the COCO captioning scorers (PTB tokenizer, METEOR, SPICE).
# Installs default-jre-headless with apt-get when Java is missing and apt-get can run;
# otherwise says why, and the Java-based metrics report themselves unavailable.
set -u
if command -v java >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
  echo "installing a Java runtime (default-jre-headless) for the COCO captioning metrics"
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p /usr/share/man/man1 2>/dev/null || $SUDO mkdir -p /usr/share/man/man1  # openjdk's postinst needs it on slim images
  if $SUDO apt-get install -y -q --no-install-recommends default-jre-headless >/dev/null 2>&1 \
     || { $SUDO apt-get update -q >/dev/null 2>&1 \
          && $SUDO apt-get install -y -q --no-install-recommends default-jre-headless >/dev/null 2>&1; }; then
    command -v java >/dev/null 2>&1 && exit 0
  fi
fi
echo "warning: no Java runtime and it could not be installed; METEOR/SPICE/PTB-tokenizer tests will be skipped" >&2
exit 0
