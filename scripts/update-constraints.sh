#!/usr/bin/env bash
# Rewrites constraints.txt from a fresh install of ".[test]" without it: the newest releases that
# pyproject.toml admits. Then `make test` (which reinstalls .venv under the new file); commit the
# file only when that is green, so constraints.txt always names a set the tests passed with.
# The pins carry this Python's version as a marker: another Python resolves within pyproject's bounds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" install -q ".[test]"
py=$("$tmp/venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
{
  echo "# The versions \`make test\` last passed with (CPython $py, $(uname -m)); \`make test\` and \`make demo\`"
  echo "# install with this file. To move to newer releases: make constraints && make test, then commit it."
  "$tmp/venv/bin/pip" freeze --all --exclude-editable | grep -v -i '^coca\b' | sed "s/\$/ ; python_version == \"$py\"/"
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins); now run: make test"
