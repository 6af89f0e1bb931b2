"""The page of `minigpt serve` in a real browser: headless system Chromium, driven by
selenium, against the `minigpt serve` command over a tiny run.

The test types a prompt, generates greedily, waits for the streamed tokens, clicks one,
and checks the attention view against the weights it computes itself from the same run:
the step that wrote token p has its query at p - 1, over the tokens before it. With
MINIGPT_SCREENSHOT set it saves the page, attention open, to docs/images/serve-page.png.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from minigpt.checkpoint import load_run, write_run_files
from minigpt.generate import generate
from minigpt.heads import capture_attention
from minigpt.serve.page import head_roles
from minigpt.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "docs" / "images" / "serve-page.png"

TEXT = "the cat sat on the mat. the dog sat on the log. the cat saw the dog. " * 30
PROMPT = "the dog sat on"
NEW_TOKENS = 10
CLICKED = 6  # the written token whose step the test opens (0 = the first written)


def train_tiny(tiny_gpt, tokenizer: CharTokenizer, steps: int = 150):
    """A 2-layer, 4-head char model fitted briefly to TEXT: its heads have something to show.
    On one thread: a model this small trains ten times slower on two busy cores."""
    torch.manual_seed(0)
    model = tiny_gpt(tokenizer.vocab_size, block_size=32, n_head=4).train()
    data = torch.tensor(tokenizer.encode(TEXT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(data) - 33, (16,)).tolist()
            x = torch.stack([data[i : i + 32] for i in starts])
            y = torch.stack([data[i + 1 : i + 33] for i in starts])
            _, loss = model(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt) -> Path:
    tokenizer = CharTokenizer.from_text(TEXT)
    model = train_tiny(tiny_gpt, tokenizer)
    return write_run_files(tmp_path_factory.mktemp("runs") / "page", model, tokenizer)


@pytest.fixture(scope="module")
def server(run_dir, serving):
    """`minigpt serve RUN` as a user starts it, on a free loopback port: call it for its
    base URL once it serves (the browser starts meanwhile)."""
    return serving(run_dir, "--device", "cpu").url


@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium under selenium (no driver download: both paths are given)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        why = f"{CHROMIUM} or {CHROMEDRIVER} is missing (.ci/run installs chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,820"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options, webdriver.ChromeService(str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def expected(run_dir: Path):
    """What the page should show, computed here from the run: the prompt's ids followed by
    the greedy continuation, each written token's probability, and the heads' roles."""
    run = load_run(run_dir)
    model, tokenizer = run.model, run.tokenizer
    prompt = tokenizer.encode_prompt(PROMPT)
    steps = generate(model, prompt, NEW_TOKENS, temperature=0, vocab_limit=tokenizer.vocab_size)
    ids = prompt + [int(step[0]) for step in steps]
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids[:-1]]))
    probs = torch.softmax(logits[0].float(), -1)
    written = [probs[p - 1, ids[p]].item() for p in range(len(prompt), len(ids))]
    return model, tokenizer, prompt, ids, written, head_roles(model, tokenizer)


def fill(driver, field: str, value: str) -> None:
    element = driver.find_element("id", field)
    element.clear()
    element.send_keys(value)


READ_GRID = """
return [...document.querySelectorAll('#grid td')].map(td => [
  +td.dataset.layer, +td.dataset.head, +td.dataset.key, +td.dataset.weight]);
"""


def test_the_page_streams_tokens_and_shows_the_attention_of_a_clicked_step(
    server, browser, run_dir
):
    from selenium.webdriver.support.ui import WebDriverWait

    model, tokenizer, prompt, ids, written, roles = expected(run_dir)
    browser.get(server())
    fill(browser, "prompt", PROMPT)
    fill(browser, "max-tokens", str(NEW_TOKENS))
    fill(browser, "temperature", "0")
    browser.find_element("id", "generate").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element("id", "generate").text == "Generate" and tokens(d))
    assert browser.find_element("id", "error").text == ""

    # the written tokens, streamed: the greedy continuation, each shaded by its probability
    spans = tokens(browser)
    assert [int(s.get_attribute("data-index")) for s in spans] == list(range(len(prompt), len(ids)))
    assert "".join(s.get_attribute("textContent") for s in spans) == tokenizer.decode(
        ids[len(prompt) :]
    )
    shown = [float(s.get_attribute("data-prob")) for s in spans]
    assert shown == pytest.approx(written, abs=1e-4)
    assert "probability" in browser.find_element("class name", "legend").text

    # one step's attention: a row per head, a cell per key, the model's own weights
    position = len(prompt) + CLICKED
    spans[CLICKED].click()
    wait.until(lambda d: d.find_element("id", "attention").is_displayed())
    wait.until(lambda d: d.execute_script(READ_GRID))
    cells = browser.execute_script(READ_GRID)
    L, H = model.config.n_layer, model.config.n_head
    assert len(cells) == L * H * position  # keys 0..position-1: the context is not full
    A = capture_attention(model, torch.tensor([ids[:position]]))[0, :, :, -1]  # (L, H, T)
    for layer, head, key, weight in cells:
        assert math.isclose(weight, A[layer, head, key].item(), abs_tol=1e-4), (layer, head, key)
    assert sorted({(c[0], c[1]) for c in cells}) == [(lay, h) for lay in range(L) for h in range(H)]
    labels = [th.text for th in browser.find_elements("css selector", "#grid th.head")]
    assert labels == [
        f"L{lay} H{h}" + (f" {roles[lay][h]}" if roles[lay][h] else "")
        for lay in range(L)
        for h in range(H)
    ]
    if os.environ.get("MINIGPT_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.find_element("id", "attention").location_once_scrolled_into_view  # noqa: B018
        assert browser.save_screenshot(str(SCREENSHOT))


def tokens(driver) -> list:
    return driver.find_elements("css selector", "#output .tok")


def test_an_error_from_the_api_is_shown_as_text(server, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server())
    fill(browser, "prompt", PROMPT)
    fill(browser, "top-p", "0")  # the server takes top_p in (0, 1]
    browser.find_element("id", "generate").click()
    error = browser.find_element("id", "error")
    WebDriverWait(browser, 30).until(lambda d: error.is_displayed())
    assert "top_p" in error.text and "Traceback" not in error.text
    assert tokens(browser) == [] and browser.find_element("id", "generate").text == "Generate"
