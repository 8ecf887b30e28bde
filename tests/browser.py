"""Debian's Chromium, headless, as the browser tests and the console screenshots launch it."""

from __future__ import annotations

from playwright.sync_api import Browser, Playwright

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium tries the network, which this machine
# refuses, and stalls; `playwright install` cannot download a browser here either.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch_chromium(driver: Playwright) -> Browser:
    return driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
