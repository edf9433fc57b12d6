#!/usr/bin/env bash
# Install Debian's headless-capable Chromium and its WebDriver for the browser tests
# (tests/browser). Idempotent: does nothing when both are already present.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    echo "chromium and chromedriver already installed:"
    chromium --version 2>/dev/null || true
    chromedriver --version 2>/dev/null || true
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then
        SUDO="sudo"
    else
        echo "install-browser.sh: need root (or sudo) to run apt-get" >&2
        exit 1
    fi
fi

if ! have apt-get; then
    echo "install-browser.sh: apt-get not found; install chromium and chromedriver yourself" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core

chromium --version
chromedriver --version
