"""Refresh docs/annotate.png: the annotation page, signed in, on a database that has tasks.

    python docs/screenshot.py --db annotations.db --token <an annotator's token> [--out docs/annotate.png]

Starts the app on a free loopback port, signs in with Debian's chromium (Playwright), plays A,
picks a reason tag, types a comment and takes the picture. Nothing is answered.
"""
from __future__ import annotations

import argparse
import os
import socket
import threading
import time


def main() -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from speechrl.data.annotation.app import create_app
    from speechrl.data.annotation.db import open_db

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--out", default="docs/annotate.png")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(open_db(args.db)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get("SPEECHRL_CHROMIUM", "/usr/bin/chromium"),
                                     args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                           "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1000, "height": 820})
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#token", args.token)
        page.click("#signin-button")
        page.wait_for_selector("#task:not(.hidden)")
        page.keyboard.press("q")
        page.wait_for_selector("#player-a.played")
        page.keyboard.press("a")  # the first reason tag
        page.fill("#comment", "B drops the last word")
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
