"""The studio's two flows in a real headless browser (Debian's Chromium and its driver): compare
every model's answers to one prompt; label 6 pairs with the keyboard, then open the reward-signal
page. Screenshots go to .pytest_cache/artifacts/studio/."""

import os
import shutil
import threading

import pytest

from alignax.studio import labels as labels_lib
from alignax.studio.app import create_app
from alignax.studio.models import ModelHub
from alignax.studio.server import parse_models
from cli_helpers import REPO
from test_studio import PROMPTS, make_runs

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(REPO, ".pytest_cache", "artifacts", "studio")

if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
  if os.environ.get("CI"):
    raise RuntimeError("CI needs Debian's chromium and chromium-driver for the studio's browser tests "
                       "(.ci/run installs them)")
  pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)",
              allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  from werkzeug.serving import make_server
  root = make_runs(tmp_path_factory.mktemp("pipeline"), stages=("pretrain", "sft", "ppo", "dpo"))
  store = labels_lib.LabelStore(str(tmp_path_factory.mktemp("labels") / "labels.jsonl"))
  app = create_app(ModelHub(parse_models(root, [])), store, PROMPTS, rater="browser", seed=1)
  httpd = make_server("127.0.0.1", 0, app, threaded=True)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_port}", store
  httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--window-size=1280,900",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(DRIVER), options=options)
  driver.set_page_load_timeout(60)
  os.makedirs(ARTIFACTS, exist_ok=True)
  yield driver
  driver.quit()


def _wait(driver, condition, timeout=120):
  from selenium.webdriver.support.ui import WebDriverWait
  return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def test_compare_page_shows_every_model_side_by_side(server, browser):
  from selenium.webdriver.common.by import By
  url, _ = server
  # The link reproduces the view: prompt and settings in the URL, answered on load.
  browser.get(f"{url}/?prompt=What+is+the+capital+of+France%3F&max_new_tokens=12&models=base,sft,ppo,dpo")
  _wait(browser, lambda d: d.find_element(By.ID, "results").get_attribute("data-done") == "1")
  cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
  assert [c.get_attribute("data-model") for c in cards] == ["base", "sft", "ppo", "dpo"]
  assert all(c.find_elements(By.CSS_SELECTOR, ".gold") for c in cards)
  assert browser.find_element(By.ID, "prompt").get_attribute("value") == "What is the capital of France?"
  # Searching the world's prompts fills the prompt box.
  browser.find_element(By.ID, "search").send_keys("cow")
  _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#prompt-list li")) == 1)
  browser.find_element(By.CSS_SELECTOR, "#prompt-list li").click()
  assert browser.find_element(By.ID, "prompt").get_attribute("value") == "What sound does a cow make?"
  browser.save_screenshot(os.path.join(ARTIFACTS, "compare.png"))
  assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None


def test_label_six_pairs_with_the_keyboard_then_see_the_reward_signal(server, browser):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  url, store = server
  browser.get(f"{url}/label")
  body = browser.find_element(By.TAG_NAME, "body")
  keys = ["a", "b", "1", "t", "2", "a", "b"]
  for i, key in enumerate(keys):
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-pair"))
    pair = body.get_attribute("data-pair")
    if i == 0:
      browser.save_screenshot(os.path.join(ARTIFACTS, "label.png"))
    ActionChains(browser).send_keys(key).perform()
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-labels") == str(i + 1))
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-pair") != pair)
  prefs, ties = store.read()
  assert len(prefs) == 6 and len(ties) == 1
  assert [r["_choice"] for r in prefs] == ["A", "B", "A", "B", "A", "B"]
  assert "A was" in browser.find_element(By.ID, "label-status").text
  browser.get(f"{url}/signal")
  _wait(browser, lambda d: d.find_elements(By.ID, "chart") or d.find_elements(By.ID, "gold-agreement"))
  assert browser.find_elements(By.CSS_SELECTOR, "#chart .bar")
  assert "agreement with the gold labeler" in browser.find_element(By.ID, "gold-agreement").text
  browser.save_screenshot(os.path.join(ARTIFACTS, "signal.png"))
