#!/usr/bin/env bash
# Install what the browser test (tests/test_web.py) needs: Debian's chromium and the page's
# npm packages, from web/package-lock.json (npm ci). Safe to run again; CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "install_web_deps: /usr/bin/chromium missing; run: sudo apt-get install chromium" >&2
    fi
fi

if command -v npm >/dev/null 2>&1; then
    (cd web && npm ci --no-audit --no-fund --loglevel=error)
else
    echo "install_web_deps: npm not found (install Node.js 20+); the browser test will skip" >&2
fi
