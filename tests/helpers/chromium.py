"""The headless-Chromium executable for browser tests: a failure in CI (``.ci/run`` installs it), a skip elsewhere."""

from __future__ import annotations

import os
import shutil

import pytest


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe
