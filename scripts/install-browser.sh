#!/usr/bin/env bash
# Installs the headless browser the page's tests drive (tests/test_ui.py): Debian's Chromium and its
# WebDriver, at one pinned version (the driver must match the browser). Nothing happens when both are there.
#
#   scripts/install-browser.sh
set -o errexit -o nounset -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian 12's security release of Chromium; chromium-driver is built from the same source at the same version.
CHROMIUM_PACKAGE="chromium=156.0.8078.129-1~deb12u1"
DRIVER_PACKAGE="chromium-driver=156.0.8078.129-1~deb12u1"

scripts/apt-install.sh chromium "$CHROMIUM_PACKAGE"
scripts/apt-install.sh chromedriver "$DRIVER_PACKAGE"
