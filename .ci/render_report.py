"""Render a Snakemake HTML report in headless Chromium and check that a person would see the results:
the Results category lists the run's summary, the FID/CLIP plot and the loss curve, and the Sample
images category shows images that the browser decoded. Writes screenshots of both.

    python .ci/render_report.py REPORT.html OUT_PREFIX   (needs: pip install playwright; Debian chromium)
"""

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EXPECTED = {"Results": ["summary.txt", "eval.png", "loss.png", "mlperf_check.txt"], "Sample images": ["_samples.png"]}


def open_category(page, report: Path, name: str) -> str:
    """The sidebar text of a result category, opened from the report's start page."""
    page.goto(report.as_uri())
    page.wait_for_timeout(2000)
    page.locator("span", has_text=name).first.click()
    page.wait_for_timeout(1500)
    return page.inner_text("body")


def show_file(page, name: str) -> list:
    """Click the view icon of the first listed file whose name contains ``name``; the decoded images' sizes."""
    row = page.locator("li, tr, div", has_text=name).filter(has=page.locator("svg")).last
    row.locator("svg").first.click()
    page.wait_for_timeout(2500)
    return page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")


def main() -> int:
    report, prefix = Path(sys.argv[1]).resolve(), sys.argv[2]
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for category, names in EXPECTED.items():
            text = open_category(page, report, category)
            problems += [f"{category}: {name} not listed" for name in names if name not in text]
            sizes = show_file(page, names[-1] if category == "Sample images" else "eval.png")
            if not any(w > 100 and h > 100 for w, h in sizes):
                problems.append(f"{category}: no decoded image shown (image sizes {sizes})")
            shot = f"{prefix}-{category.lower().replace(' ', '-')}.png"
            page.screenshot(path=shot)
            print(f"{category}: {', '.join(n for n in names if n in text)} listed; images {sizes}; screenshot {shot}")
        browser.close()
    for problem in problems:
        print("FAILED:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
