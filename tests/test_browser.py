"""A real browser against a real ``airflow api-server``: log in, open the trigger form of
opensubject_build and see its typed parameters, open the dataset page from Airflow's
navigation and see the funnel and a failure with its reason. Screenshots go to docs/.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make system-deps``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from airflow_fixtures import (
    ADMIN_PASSWORD,
    AIRFLOW_ENV,
    FAIL_REASON,
    REPO,
    VENV_BIN,
    seed_dashboard_data,
    service_env,
)

pytestmark = pytest.mark.browser
DOCS = REPO / "docs"
PARAM_LABELS = ("Build name", "Source", "Profile", "Most videos", "Only these videos", "Run up to",
                "Export shards, manifest and report", "Videos per chunk")


def _free_port() -> int:
    from conftest import free_port

    return free_port()


@pytest.fixture()
def api_server(airflow_db, pg_db, redis_url, s3_store_settings, tmp_path, monkeypatch):
    env = {**os.environ, **AIRFLOW_ENV, **service_env(pg_db, redis_url, s3_store_settings)}
    for k, v in service_env(pg_db, redis_url, s3_store_settings).items():
        monkeypatch.setenv(k, v)
    from opensubject_tasks.orchestrate import context

    seed_dashboard_data(context())
    # The UI reads DAGs from the metadata database, where the dag-processor puts them.
    out = subprocess.run([str(VENV_BIN / "airflow"), "dags", "reserialize"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    port = _free_port()
    log = open(tmp_path / "api-server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(VENV_BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(base + "/api/v2/monitor/health", timeout=5):  # noqa: S310
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("airflow api-server did not come up:\n"
                                + (tmp_path / "api-server.log").read_text(errors="replace")[-4000:])
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


# True once no finite CSS animation or transition runs in the page or its iframes.
SETTLED_JS = """
return [document, ...Array.from(document.querySelectorAll('iframe'), f => f.contentDocument)]
  .filter(Boolean)
  .every(doc => doc.getAnimations().every(a => a.playState !== 'running'
                                           || a.effect.getComputedTiming().iterations === Infinity));
"""


def settled(d) -> bool:  # noqa: ANN001
    """The page has finished animating (a screenshot now shows what stays)."""
    return bool(d.execute_script(SETTLED_JS))


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("Debian's chromium and chromium-driver are needed: run `make system-deps` "
                    "(apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1900", "--hide-scrollbars"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    yield d
    d.quit()


def test_trigger_form_and_dataset_page(api_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, d = api_server, browser
    wait = WebDriverWait(d, 60)

    # The dataset page and its API refuse a request without Airflow's login token.
    for path in ("/opensubject/", "/opensubject/api/summary"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=10)  # noqa: S310
        assert err.value.code == 401
    d.get(base + "/opensubject/")
    assert "not authenticated" in d.page_source and FAIL_REASON not in d.page_source

    # Log in through Airflow's own login page.
    d.get(base + "/auth/login?next=%2Fdags%2Fopensubject_build")
    fields = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[name=username], input[name=password]"))
    assert len(fields) == 2
    d.find_element(By.CSS_SELECTOR, "input[name=username]").send_keys("admin")
    d.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(ADMIN_PASSWORD)
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: d.current_url.endswith("/dags/opensubject_build"))
    assert any(c["name"] == "_token" for c in d.get_cookies())

    # The trigger form shows every typed parameter.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']"))[0].click()
    dialog = wait.until(lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog]")
                                        if "Run Parameters" in e.text), None))
    wait.until(lambda d: all(label in dialog.text for label in PARAM_LABELS))
    assert "opensubject_build" in dialog.text
    wait.until(settled)  # the modal's opening animation has finished: screenshot
    d.save_screenshot(str(DOCS / "airflow_trigger_form.png"))

    # The dataset page, from Airflow's navigation (an external view in an iframe).
    d.get(base + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Browse']"))[0].click()
    link = wait.until(lambda d: next((e for e in d.find_elements(By.XPATH, "//*[text()='OpenSubject dataset']")
                                      if e.is_displayed()), None))
    link.click()
    frame = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe"))
    assert frame.get_attribute("src").endswith("/opensubject/")
    d.switch_to.frame(frame)
    wait.until(lambda d: "Stage funnel" in d.page_source)
    text = d.find_element(By.TAG_NAME, "body").text
    assert "Failures by reason" in text and FAIL_REASON in text
    assert "identity not preserved" in text
    d.switch_to.default_content()
    height = d.execute_script("return window.innerHeight")
    d.set_window_size(1400, 1300)
    wait.until(lambda d: d.execute_script("return window.innerHeight") != height and settled(d))
    d.save_screenshot(str(DOCS / "dashboard.png"))
    assert (DOCS / "dashboard.png").stat().st_size > 10_000
