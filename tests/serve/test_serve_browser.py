"""The page in a real browser (headless chromium through selenium): live status, a question, the
streamed answer, and the retrieved moments with their thumbnails on the stream's timeline."""

from __future__ import annotations

import os

import pytest

from serve_helpers import frames, stored

selenium = pytest.importorskip("selenium", reason="the browser test needs selenium: pip install 'mukv[test]'")


@pytest.fixture(scope="module")
def browser():
    import serve_browser as chrome

    try:
        d = chrome.driver()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {exc}")
        pytest.skip(str(exc))
    yield d
    d.quit()


def test_page_shows_streams_answers_and_moments(serve, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mukv.bench import Benchmark

    bench = Benchmark.generate(seed=0, minutes=2, questions=4)
    with serve() as (c, app, url):
        c.create_stream("lobby")
        c.create_stream("garage")
        c.push("lobby", bench.stream.frames(0, 24))
        c.push("garage", frames(3))
        stored(c, "lobby", 24)
        stored(c, "garage", 3)
        wait = WebDriverWait(browser, 60, poll_frequency=0.1)
        browser.get(url + "/")
        card = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '.stream[data-id="lobby"]'))
        wait.until(lambda d: card.find_element(By.CLASS_NAME, "n-frames").text == "24")
        assert card.find_element(By.CLASS_NAME, "role").text == "writer"
        assert card.find_element(By.CLASS_NAME, "n-time").text == "0:46"
        assert len(browser.find_elements(By.CSS_SELECTOR, ".stream")) == 2

        # live status: frames pushed now show up without reloading the page
        c.push("lobby", bench.stream.frames(24, 30))
        wait.until(lambda d: card.find_element(By.CLASS_NAME, "n-frames").text == "30")

        question = bench.questions[0].text
        box = card.find_element(By.CLASS_NAME, "ask-input")
        box.send_keys(question)
        card.find_element(By.CLASS_NAME, "ask-button").click()
        wait.until(lambda d: card.find_element(By.CLASS_NAME, "answer-meta").text)
        answer = c.ask("lobby", question)
        assert card.find_element(By.CLASS_NAME, "answer-text").text == (answer["text"] or "(empty answer)")
        assert "moments" in card.find_element(By.CLASS_NAME, "answer-meta").text
        marks = card.find_elements(By.CSS_SELECTOR, ".timeline .mark")
        assert len(marks) == len(answer["blocks"])
        wait.until(lambda d: len(card.find_elements(By.CSS_SELECTOR, ".moments img.thumb[data-loaded='1']"))
                   == len(card.find_elements(By.CSS_SELECTOR, ".moments img.thumb")) > 0)
        sizes = browser.execute_script(
            "return [...arguments[0].querySelectorAll('.moments img.thumb')].map(i => [i.naturalWidth, i.naturalHeight])",
            card)
        assert sizes and all(w > 0 and h > 0 for w, h in sizes)  # real JPEGs, decoded by the browser
        assert not card.find_element(By.CLASS_NAME, "error").is_displayed()
        browser.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("MUKV_SCREENSHOT"):
            browser.save_screenshot(os.environ["MUKV_SCREENSHOT"])
