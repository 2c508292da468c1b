"""Screenshots of alignax studio over a pipeline directory, for the README (headless Chromium).

  python experiments/studio_screenshots.py --workdir=runs/pipeline_tiny --out=docs/images

Serves the studio on a free localhost port, opens the compare page with base, SFT, PPO and DPO
answering one prompt, labels 6 pairs on the label page (choosing the answer the gold labeler
prefers, as a stand-in for a person), and opens the reward-signal page. Labels go to
OUT/studio_labels.jsonl.
"""

from __future__ import annotations

import os
import sys
import threading

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/pipeline_tiny", "Pipeline directory.")
_OUT = flags.DEFINE_string("out", "docs/images", "Where the PNGs go.")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "Compare-page prompt.")


def main(_):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  from werkzeug.serving import make_server

  from alignax.studio.app import create_app
  from alignax.studio.labels import LabelStore
  from alignax.studio.models import ModelHub, world_prompts
  from alignax.studio.server import parse_models

  os.makedirs(_OUT.value, exist_ok=True)
  labels = os.path.join(_OUT.value, "studio_labels.jsonl")
  for path in (labels, labels.replace(".jsonl", ".ties.jsonl")):
    if os.path.exists(path):
      os.remove(path)
  models = parse_models(_WORKDIR.value, [])
  store = LabelStore(labels)
  flask_app = create_app(ModelHub(models), store, world_prompts(_WORKDIR.value), rater="readme", seed=4)
  httpd = make_server("127.0.0.1", 0, flask_app, threaded=True)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{httpd.server_port}"
  options = webdriver.ChromeOptions()
  options.binary_location = "/usr/bin/chromium"
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--window-size=1280,760"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
  wait = lambda cond: WebDriverWait(driver, 300).until(lambda d: cond(d))
  try:
    shown = ",".join(n for n in ("base", "sft", "ppo", "dpo") if n in models)
    driver.get(f"{url}/?prompt={_PROMPT.value.replace(' ', '+').replace('?', '%3F')}&models={shown}")
    wait(lambda d: d.find_element(By.ID, "results").get_attribute("data-done") == "1")
    driver.save_screenshot(os.path.join(_OUT.value, "studio_compare.png"))
    driver.get(f"{url}/label")
    body = lambda: driver.find_element(By.TAG_NAME, "body")
    for i in range(6):
      wait(lambda d: body().get_attribute("data-pair"))
      pair_id = body().get_attribute("data-pair")
      if i == 0:
        driver.save_screenshot(os.path.join(_OUT.value, "studio_label.png"))
      # The stand-in rater: the gold labeler's choice (the server knows the pending pair).
      a, b = _gold_pair(flask_app, pair_id)
      ActionChains(driver).send_keys("a" if a >= b else "b").perform()
      wait(lambda d: body().get_attribute("data-labels") == str(i + 1))
    driver.get(f"{url}/signal")
    wait(lambda d: d.find_elements(By.ID, "chart"))
    driver.save_screenshot(os.path.join(_OUT.value, "studio_signal.png"))
  finally:
    driver.quit()
    httpd.shutdown()
  print(f"wrote {_OUT.value}/studio_compare.png, studio_label.png, studio_signal.png; labels: {labels}")


def _gold_pair(flask_app, pair_id):
  """The gold scores of the pending pair's responses (A, B)."""
  pending = flask_app.config["STUDIO_PENDING"]
  a, b = pending[pair_id]["responses"]
  return a["score"], b["score"]


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
