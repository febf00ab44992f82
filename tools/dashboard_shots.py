"""Screenshots of lorapipe's reports as the ZenML dashboard shows them, taken in a real browser.

Starts a local ZenML server on a temporary store (`zenml login --local`, no Docker), runs the quickstart against
it, then opens the run in headless Chromium (Debian's `chromium` package, driven by Playwright with
`executable_path`: no browser download), answers the dashboard's first-visit survey, and for every report artifact
opens its Visualization tab, loads the preview and saves a screenshot to docs/dashboard/<artifact>.png. The
dashboard shows an HTML view in a frame of fixed height that scrolls; `<artifact>_full.png` is the same stored
HTML rendered whole at the frame's width, so a reader sees every section.

    .venv/bin/pip install playwright && apt-get install chromium      # once
    .venv/bin/python tools/dashboard_shots.py [--out docs/dashboard] [--port 8239]

Needs the tiny model (`make tiny-model`). The server and the temporary store are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ARTIFACTS = ["validated_dataset", "validation_report", "rejected_rows", "preflight_report", "training_plan",
             "evaluation_plan", "merge_plan", "adapter", "eval_metrics", "merged_model", "model_version_report"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def answer_survey(page) -> None:
    """The dashboard asks new users a few questions once; answer with the least: a name, no newsletter, skip."""
    for _ in range(8):
        if "/survey" not in page.url:
            return
        if page.get_by_label("Name").count():
            page.get_by_label("Name").fill("lorapipe")
        checked = page.locator("button[role=checkbox][data-state=checked]")
        if checked.count():
            checked.first.click()
        for label in ("Skip this step", "Continue", "Go to Dashboard"):
            button = page.get_by_role("button", name=label)
            if button.count() and button.first.is_enabled():
                button.first.click()
                page.wait_for_timeout(1500)
                break
        else:
            options = page.locator("[role=radio], [role=checkbox]")
            if options.count():
                options.first.click()


def html_views(env: dict) -> dict[str, str]:
    """artifact name -> its first HTML visualization file, read from the store the run wrote."""
    code = ("import json; from zenml.client import Client; run = Client().list_pipeline_runs(sort_by='desc:created', "
            "size=1).items[0]; print(json.dumps({n: [v.uri for v in (vs[0].visualizations or []) if "
            "v.uri.endswith('.html')] for s in run.steps.values() for n, vs in s.outputs.items()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return {name: uris[0] for name, uris in json.loads(out.stdout.strip().splitlines()[-1]).items() if uris}


def shoot(url: str, run_id: str, out: Path, views: dict[str, str]) -> list[Path]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("headless Chromium is needed: apt-get install chromium")
    saved = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url, wait_until="networkidle")
        answer_survey(page)
        run_page = f"{url}/projects/default/runs/{run_id}"
        page.goto(run_page, wait_until="networkidle")
        page.screenshot(path=str(out / "run_dag.png"))
        saved.append(out / "run_dag.png")
        for name in ARTIFACTS:
            page.goto(run_page, wait_until="networkidle")
            # the artifact's node, not a step whose name contains it ("adapter" vs "train_adapter")
            page.get_by_role("button", name=re.compile(rf"^{name}\s")).first.click()
            page.get_by_role("tab", name="Visualization").last.click()
            preview = page.get_by_role("button", name="Load Preview")
            preview.first.wait_for(timeout=15000)
            preview.first.click()
            page.wait_for_timeout(2500)  # the frame renders the stored HTML / image
            path = out / f"{name}.png"
            page.screenshot(path=str(path))
            saved.append(path)
            if name in views:  # the whole report at the width of the dashboard's side sheet
                full = browser.new_page(viewport={"width": 860, "height": 900})
                full.goto(Path(views[name]).as_uri())
                full.screenshot(path=str(out / f"{name}_full.png"), full_page=True)
                full.close()
                saved.append(out / f"{name}_full.png")
        browser.close()
        for path in saved:
            print(f"saved {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "dashboard"))
    parser.add_argument("--port", type=int, default=8239, help="the temporary local server's port")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="lorapipe-dashboard-"))
    env = {**os.environ, "ZENML_CONFIG_PATH": str(home / "zenml"), "ZENML_ANALYTICS_OPT_IN": "false",
           "ZENML_AUTO_OPEN_DASHBOARD": "false", "HF_HUB_OFFLINE": "1"}
    try:
        run([str(BIN / "zenml"), "login", "--local", "--port", str(args.port)], env)
        run([str(BIN / "lorapipe"), "run", "-c", "configs/quickstart.yaml",
             "--set", f"train.output_root={home / 'runs'}"], env)
        run_id = subprocess.run(
            [sys.executable, "-c", "from zenml.client import Client; "
             "print(Client().list_pipeline_runs(sort_by='desc:created', size=1).items[0].id)"],
            cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        shoot(f"http://127.0.0.1:{args.port}", run_id, out, html_views(env))
    finally:
        subprocess.run([str(BIN / "zenml"), "logout", "--local"], cwd=REPO, env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
