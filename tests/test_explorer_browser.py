"""The explorer page in a real browser: Debian's chromium, headless, driven by selenium through the system
chromedriver (nothing is downloaded), against a live server on loopback. The numbers the page shows are
checked against Explain over gRPC, to the precision printed; a screenshot is saved under build/.

Skips, with the reason, where chromium, chromedriver or selenium is missing (.ci/run installs them).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from protoserve_client import pb

from conftest import RunningServer, free_port
from server.settings import Settings
from test_security import TOKEN, token_file  # noqa: F401 (a fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
HALF_UNIT = 0.5e-4 + 1e-9  # the page prints 4 decimals

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"no chromium and chromedriver at {CHROMIUM}, {CHROMEDRIVER} "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1700"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")  # with both paths given selenium-manager has nothing to find; nor may it
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(browser, server) -> None:
    """A fresh page (the same address again would only move to its #fragment, keeping the old page)."""
    browser.get("about:blank")
    browser.get(f"http://{server.http_address}/#mnist")


def number(text: str) -> float:
    return float(text.replace("\u2212", "-"))


def assert_shown(element, value: float) -> None:
    text = element.get_attribute("textContent")  # shown or folded away (inactive components)
    assert abs(number(text) - value) <= HALF_UNIT, (text, value)


def wait_for_explanation(browser, caption: str):
    WebDriverWait(browser, 60).until(
        lambda d: caption in d.find_element(By.ID, "input-caption").text
        and "busy" not in d.find_element(By.TAG_NAME, "body").get_attribute("class")
        and d.find_elements(By.CSS_SELECTOR, "#components button[data-component-id]"))


def check_page_against(browser, expected: pb.ExplainResponse) -> None:
    """The prediction table, the target logit, and each component's weight and contribution."""
    assert_shown(browser.find_element(By.ID, "target-logit"), expected.target_logit)
    assert browser.find_element(By.ID, "predicted-label").text == expected.prediction[0].label
    rows = browser.find_elements(By.CSS_SELECTOR, "#prediction tr[data-class-index]")
    assert [int(r.get_attribute("data-class-index")) for r in rows] == [s.class_index for s in expected.prediction[:5]]
    for row, score in zip(rows, expected.prediction):
        assert_shown(row.find_element(By.CLASS_NAME, "logit"), score.logit)
        assert_shown(row.find_element(By.CLASS_NAME, "probability"), score.probability)
    shown = {button.get_attribute("data-component-id"): button
             for button in browser.find_elements(By.CSS_SELECTOR, "#components button[data-component-id]")}
    assert set(shown) == {c.id for c in expected.components}
    for component in expected.components:
        assert_shown(shown[component.id].find_element(By.CLASS_NAME, "weight"), component.weight)
        assert_shown(shown[component.id].find_element(By.CLASS_NAME, "contribution"), component.contribution)


def test_the_page_explains_a_sample_and_a_suppression_as_explain_does(browser, server, client):
    info = client.get_model("mnist")
    open_page(browser, server)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, 'button[data-sample="3"]'))
    active_method = browser.find_element(By.CSS_SELECTOR, ".tab.active").get_attribute("data-method")
    assert active_method == info.default_method == "protonmf"
    browser.find_element(By.CSS_SELECTOR, 'button[data-sample="3"]').click()
    wait_for_explanation(browser, "held-out sample 3")

    request = pb.ExplainRequest(model="mnist", method="protonmf", top_k=10, heatmaps=pb.HEATMAP_MODE_INPUT)
    request.input.CopyFrom(info.samples[3].input)
    expected = client.stub.Explain(request, timeout=60)
    check_page_against(browser, expected)
    residual = browser.find_element(By.ID, "residual").text
    assert f"residual share {expected.residual_share:.4f}" in residual
    # The waterfall: bias, the components, the residual, and the logit they add up to.
    steps = [g.get_attribute("data-step") for g in browser.find_elements(By.CSS_SELECTOR, "#chart g.step")]
    ranked = sorted(expected.components, key=lambda c: -abs(c.contribution))
    assert steps == ["bias", *[c.id for c in ranked], "residual", "total"]
    # The heatmap overlay and its legend, centred on zero.
    legend_min = number(browser.find_element(By.ID, "legend-min").text)
    legend_max = number(browser.find_element(By.ID, "legend-max").text)
    assert legend_max > 0 and legend_min == -legend_max
    heat = np.frombuffer(next(h.map.data for h in expected.heatmaps if h.component_id == ranked[0].id), "<f4")
    assert abs(legend_max - np.abs(heat).max()) <= 5e-3 * legend_max  # printed with 3 significant digits
    reddish = browser.execute_script(
        "const c = document.getElementById('input-canvas').getContext('2d').getImageData(0, 0, 280, 280).data;"
        "let n = 0; for (let i = 0; i < c.length; i += 4) if (c[i] > c[i + 1] + 40) n++; return n;")
    assert reddish > 100, "the top component's heatmap is drawn over the input"

    # Suppress the top component: the intervened prediction is Explain's with that intervention.
    browser.find_element(By.CSS_SELECTOR, f'#components button[data-component-id="{ranked[0].id}"]').click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "intervention").is_displayed()
                                     and "busy" not in d.find_element(By.TAG_NAME, "body").get_attribute("class"))
    request.interventions.add(suppress=[ranked[0].id])
    intervened = client.stub.Explain(request, timeout=60).interventions[0]
    assert_shown(browser.find_element(By.ID, "intervened-target-logit"), intervened.target_logit)
    assert browser.find_element(By.ID, "intervened-label").text == intervened.prediction[0].label
    rows = browser.find_elements(By.CSS_SELECTOR, "#intervened-prediction tr[data-class-index]")
    assert [int(r.get_attribute("data-class-index")) for r in rows] == [s.class_index
                                                                        for s in intervened.prediction[:5]]
    for row, score in zip(rows, intervened.prediction):
        assert_shown(row.find_element(By.CLASS_NAME, "logit"), score.logit)
        assert_shown(row.find_element(By.CLASS_NAME, "probability"), score.probability)
    assert abs(intervened.target_logit - (expected.target_logit - ranked[0].contribution)) <= 1e-4
    suppressed = browser.find_element(By.CSS_SELECTOR, f'#components button[data-component-id="{ranked[0].id}"]')
    assert "suppressed" in suppressed.get_attribute("class")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "explorer.png"))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_a_dropped_image_is_explained_as_explain_explains_it(browser, server, client, mnist_split, tmp_path):
    digit = (mnist_split["x_test"][7, 0].numpy() * 255).clip(0, 255).astype(np.uint8)
    png = tmp_path / "digit.png"
    buffer = io.BytesIO()
    Image.fromarray(digit, mode="L").save(buffer, format="PNG")
    png.write_bytes(buffer.getvalue())
    open_page(browser, server)
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#components button[data-component-id]"))
    browser.find_element(By.CSS_SELECTOR, 'button[data-method="srae"]').click()
    WebDriverWait(browser, 60).until(lambda d: "active" in d.find_element(
        By.CSS_SELECTOR, 'button[data-method="srae"]').get_attribute("class"))
    browser.find_element(By.ID, "file-input").send_keys(str(png))
    wait_for_explanation(browser, "digit.png")
    expected = client.explain(image=png.read_bytes(), model="mnist", method="srae", top_k=10, heatmaps="input")
    check_page_against(browser, expected)
    assert browser.find_element(By.ID, "additivity").text.startswith("additivity gap")


def test_the_gallery_and_fit_report_of_each_method(browser, server, client):
    info = client.get_model("mnist")
    open_page(browser, server)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".gallery-item"))
    for method in info.methods:
        browser.find_element(By.CSS_SELECTOR, f'button[data-method="{method.name}"]').click()
        WebDriverWait(browser, 30).until(lambda d: "active" in d.find_element(
            By.CSS_SELECTOR, f'button[data-method="{method.name}"]').get_attribute("class"))
        items = browser.find_elements(By.CSS_SELECTOR, ".gallery-item")
        assert [i.get_attribute("data-component-id") for i in items] == [
            c.id for c in sorted(method.components, key=lambda c: c.class_index)]
        with_exemplar = sum(1 for c in method.components if c.exemplar_png)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".gallery-item img.exemplar")) == with_exemplar
        assert browser.find_elements(By.CSS_SELECTOR, "#fit-report table.report-table"), method.name


def test_a_component_clicked_in_the_gallery_is_suppressed(browser, server, client):
    info = client.get_model("mnist")
    open_page(browser, server)  # the first sample, explained by the default method
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#components button[data-component-id]"))
    browser.find_element(By.CSS_SELECTOR, '.gallery-item[data-component-id="c0.p1"]').click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "intervention").is_displayed()
                                     and "busy" not in d.find_element(By.TAG_NAME, "body").get_attribute("class"))
    request = pb.ExplainRequest(model="mnist", top_k=10, interventions=[pb.Intervention(suppress=["c0.p1"])])
    request.input.CopyFrom(info.samples[0].input)
    intervened = client.stub.Explain(request, timeout=60).interventions[0]
    assert_shown(browser.find_element(By.ID, "intervened-target-logit"), intervened.target_logit)
    for selector in ('.gallery-item[data-component-id="c0.p1"]', '#components button[data-component-id="c0.p1"]'):
        assert "suppressed" in browser.find_element(By.CSS_SELECTOR, selector).get_attribute("class")


def test_a_series_model_draws_its_input_and_heatmap_and_ranks_a_non_additive_method(browser, server, client):
    from selenium.webdriver.support.ui import Select

    info = client.get_model("ecg")
    open_page(browser, server)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".sample"))
    Select(browser.find_element(By.ID, "model-select")).select_by_visible_text("ecg v1")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, 'button[data-sample="4"] svg'))
    browser.find_element(By.CSS_SELECTOR, 'button[data-sample="4"]').click()
    wait_for_explanation(browser, "held-out sample 4")
    method = browser.find_element(By.CSS_SELECTOR, ".tab.active").get_attribute("data-method")
    assert method == info.default_method and not next(m for m in info.methods if m.name == method).additive
    request = pb.ExplainRequest(model="ecg", method=method, top_k=len(info.labels), heatmaps=pb.HEATMAP_MODE_INPUT)
    request.input.CopyFrom(info.samples[4].input)
    expected = client.stub.Explain(request, timeout=60)
    check_page_against(browser, expected)
    assert browser.find_element(By.ID, "decomposition-title").text == "Components, ranked"
    top = max(expected.components, key=lambda c: (abs(c.contribution), c.weight))
    assert browser.find_element(By.ID, "heatmap-select").get_attribute("value") == top.id  # a new input's default
    bands = browser.find_elements(By.CSS_SELECTOR, "#input-series rect")
    assert len(bands) == info.input_shape[-1] and browser.find_element(By.CSS_SELECTOR, "#input-series path")


def test_a_server_with_bearer_tokens_gets_the_token_the_user_types(browser, demo_store, token_file):  # noqa: F811
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, http_port=free_port(),
                                     auth_token_file=token_file, shutdown_grace_s=2.0))
    try:
        browser.get("about:blank")
        browser.get(f"http://{running.http_address}/#mnist")
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "token-dialog").is_displayed())
        browser.find_element(By.ID, "token-input").send_keys(TOKEN + "\n")
        WebDriverWait(browser, 60).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#components button[data-component-id]"))
        assert browser.execute_script("return sessionStorage.getItem('protoserve-token')") == TOKEN
    finally:
        browser.execute_script("sessionStorage.clear()")
        running.stop()
