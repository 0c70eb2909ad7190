"""The draw-a-digit page (ui/) in a real browser, headless Chromium driven by Selenium, against a real TorchServe
that admits the page's origin: MNIST test digits drawn back as pen strokes are read right, a dropped image is
answered, errors are shown as the API gives them, and the page goes on working after them."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from bodies import encoded
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver import ActionChains
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from strokes import digit_strokes

from handler.mnist_handler import SHA256_SHOWN
from handler.server import Server, ServerError, cors_properties, served_model_environment, start_torchserve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import ui_server  # noqa: E402 (scripts/ is not a package)

pytestmark = [pytest.mark.slow, pytest.mark.serve]

DRAWN = 30  # test digits drawn: enough for a 9-in-10 figure to mean something, about a minute of drawing
READ_RIGHT = 0.9
CANVAS = 280
ANSWER_TIMEOUT_S = 30  # one prediction; generous for a busy 2-core machine
MOVE_MS = 5  # per pointer move: a quick but real stroke, one pointermove event each
# Each digit is drawn with one of these in turn: the page takes Pointer Events from all three.
POINTERS = (interaction.POINTER_MOUSE, interaction.POINTER_PEN, interaction.POINTER_TOUCH)


@pytest.fixture(scope="module")
def page():
    """scripts/ui_server.py serving ui/ on a free port of 127.0.0.1, as `make ui` does on 8088."""
    server = ui_server.page_server(port=0, quiet=True)
    ui_server.serve_in_background(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def allowed_origin(page) -> str:
    """The module's TorchServe (served.py's `server`) admits this page's origin, and only it."""
    return ui_server.origin(page)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages (scripts/install-browser.sh installs the pinned ones)."""
    installed = subprocess.run(
        [str(ROOT / "scripts" / "install-browser.sh")], capture_output=True, text=True, timeout=900
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--window-size=900,800", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    if os.geteuid() == 0:  # Chromium's sandbox refuses to start as root
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for failure messages
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    yield driver
    driver.quit()


@dataclass
class Shown:
    """What the page shows after a request."""

    digit: str
    error: str
    version: str
    sha256: str
    status: str


class DrawPage:
    """The page as a person uses it: draw strokes, drop or choose a file, read what it shows."""

    def __init__(self, driver: webdriver.Chrome, address: str):
        self.driver = driver
        driver.get(address)
        self.pad = driver.find_element(By.ID, "pad")

    def asked(self) -> int:
        return int(self.pad.get_attribute("data-asked") or 0)

    def draw(self, strokes: list[list[tuple[int, int]]], pointer: str = interaction.POINTER_MOUSE) -> None:
        """Pen down at each stroke's first point, through its points, up; all strokes in one go."""
        self.driver.find_element(By.ID, "clear").click()
        actions = ActionBuilder(self.driver, mouse=PointerInput(pointer, pointer), duration=MOVE_MS)
        for stroke in strokes:
            # Offsets are from the canvas's centre (WebDriver's rule for an element origin).
            (x, y), rest = stroke[0], stroke[1:]
            actions.pointer_action.move_to(self.pad, x - CANVAS // 2, y - CANVAS // 2)
            actions.pointer_action.pointer_down()
            for x, y in rest:
                actions.pointer_action.move_to(self.pad, x - CANVAS // 2, y - CANVAS // 2)
            actions.pointer_action.pointer_up()
        actions.perform()

    def drop(self, name: str, data: bytes, kind: str) -> None:
        """A file dropped on the page, as a drag from the desktop delivers it."""
        self.driver.execute_script(
            """const [name, data, kind] = arguments;
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const files = new DataTransfer();
            files.items.add(new File([bytes], name, {type: kind}));
            document.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));""",
            name,
            base64.b64encode(data).decode(),
            kind,
        )

    def choose(self, path: Path) -> None:
        self.driver.find_element(By.ID, "file").send_keys(str(path))

    def answer(self, after: int) -> Shown:
        """What the page shows once the newest request sent after request number `after` is answered."""

        def answered(_) -> bool:
            asked = self.asked()
            settled = self.pad.get_attribute("data-settling") is None  # no stroke's request still to come
            return settled and asked > after and self.pad.get_attribute("data-answered") == str(asked)

        try:
            WebDriverWait(self.driver, ANSWER_TIMEOUT_S, poll_frequency=0.05).until(answered)
        except TimeoutException:
            status = self.driver.find_element(By.ID, "status").text
            pytest.fail(f"no answer within {ANSWER_TIMEOUT_S} s; the page says {status!r}; {self.console()}")
        text = {
            name: self.driver.find_element(By.ID, name).text
            for name in ("digit", "error", "model-version", "model-sha256", "status")
        }
        return Shown(text["digit"], text["error"], text["model-version"], text["model-sha256"], text["status"])

    def console(self) -> str:
        """What the page's console said since last asked: where a browser explains a refused request (CORS)."""
        return "its console:\n" + "\n".join(entry["message"] for entry in self.driver.get_log("browser"))

    def draw_and_read(self, image, pointer: str = interaction.POINTER_MOUSE) -> Shown:
        before = self.asked()
        self.draw(digit_strokes(image), pointer)
        return self.answer(before)


@pytest.fixture(scope="module")
def draw_page(browser, page, server) -> DrawPage:
    return DrawPage(browser, ui_server.page_address(page, server.url()))


def test_the_server_names_the_one_page_origin_and_refuses_wildcards():
    assert cors_properties("http://127.0.0.1:8088").splitlines()[1:] == [
        "cors_allowed_origin=http://127.0.0.1:8088",
        "cors_allowed_methods=POST",
        "cors_allowed_headers=Content-Type",
    ]
    for wrong in ("*", "http://127.0.0.1:8088/", "http://a:1,http://b:2", "127.0.0.1:8088", "null"):
        with pytest.raises(ServerError, match="scheme://host"):
            cors_properties(wrong)


def test_the_browsers_preflight_is_answered_for_the_page_origin(server, page):
    """What Chromium asks before posting JSON from another origin, and what TorchServe answers."""
    allowed_origin = ui_server.origin(page)
    request = urllib.request.Request(
        server.url(),
        method="OPTIONS",
        headers={
            "Origin": allowed_origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
        assert answer.headers["Access-Control-Allow-Origin"] == allowed_origin
        assert answer.headers["Access-Control-Allow-Methods"] == "POST"
        assert answer.headers["Access-Control-Allow-Headers"] == "Content-Type"


def test_test_digits_drawn_as_strokes_are_read_right(draw_page, digits, archive, tmp_path_factory):
    images, labels = digits
    served = served_model_environment(archive)
    right, wrong, started = 0, [], time.monotonic()
    for number, (image, label) in enumerate(zip(images[:DRAWN], labels[:DRAWN], strict=True)):
        shown = draw_page.draw_and_read(image, POINTERS[number % len(POINTERS)])
        assert shown.error == "", f"{shown}; {draw_page.console()}"
        assert (shown.version, shown.sha256) == (
            served["SERVED_MODEL_VERSION"],
            served["SERVED_MODEL_SHA256"][:SHA256_SHOWN],
        )
        if shown.digit == str(label):
            right += 1
        else:
            wrong.append(f"test digit #{number} ({label}) read as {shown.digit}")
    seconds = time.monotonic() - started
    print(
        f"\ndrawn in the browser: {right} of {DRAWN} test digits read right ({right / DRAWN:.0%}), "
        f"{seconds:.1f} s ({seconds / DRAWN:.2f} s a digit: strokes, request, answer shown)"
        + "".join(f"\n  {line}" for line in wrong)
    )
    screenshot = tmp_path_factory.mktemp("ui") / "draw-a-digit.png"
    draw_page.driver.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert right >= READ_RIGHT * DRAWN


def test_a_dropped_image_file_is_answered(draw_page, known):
    images, labels = known
    before = draw_page.asked()
    draw_page.drop("digit.png", encoded(255 - images[0]), "image/png")  # dark on light, as a scan or photo
    shown = draw_page.answer(before)
    assert (shown.error, shown.digit) == ("", str(labels[0]))
    assert "digit.png" in shown.status


def test_a_file_that_is_no_image_shows_the_apis_error_and_the_page_goes_on(draw_page, known, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a digit\n")
    before = draw_page.asked()
    draw_page.choose(notes)
    shown = draw_page.answer(before)
    print(f"\nthe page shows: {shown.error}")
    assert shown.error.startswith("415 Unsupported Media Type: unsupported content"), shown
    assert shown.digit == "–"
    images, labels = known
    shown = draw_page.draw_and_read(images[1])
    assert (shown.error, shown.digit) == ("", str(labels[1]))


def test_the_controls_are_labelled_and_reached_by_keyboard_with_visible_focus(draw_page, known):
    driver = draw_page.driver
    images, _ = known
    draw_page.draw_and_read(images[0])
    driver.find_element(By.TAG_NAME, "body").click()
    reached = []
    for _ in range(6):
        ActionChains(driver).send_keys(Keys.TAB).perform()  # to whatever has focus, as a keyboard does
        focused = driver.switch_to.active_element
        name = focused.accessible_name
        outline = focused.value_of_css_property("outline-style")
        reached.append((focused.get_attribute("id"), bool(name), outline))
    ids = [id_ for id_, _, _ in reached]
    assert ids[:4] == ["pad", "clear", "file", "api"], reached
    assert all(named and outline == "solid" for _, named, outline in reached[:4]), reached
    # Escape on the focused drawing area clears it: the canvas is all paper again.
    driver.find_element(By.ID, "pad").send_keys(Keys.ESCAPE)
    blank = driver.execute_script(
        "const pad = document.getElementById('pad');"
        "return pad.getContext('2d').getImageData(0, 0, pad.width, pad.height).data.every((v) => v === 255);"
    )
    assert blank


def test_a_server_that_is_down_is_reported_and_the_page_recovers(
    draw_page, server: Server, archive, allowed_origin, known, tmp_path
):
    """Last in the module: it stops the module's server (TorchServe and nginx in front of it), then starts another
    on the same ports."""
    images, labels = known
    server.stop()
    shown = draw_page.draw_and_read(images[2])
    print(f"\nthe page shows: {shown.error}")
    assert shown.error.startswith(f"Could not reach {server.url()}"), shown
    assert "make serve" in shown.error and allowed_origin in shown.error
    with start_torchserve(archive, tmp_path / "logs", server.ports, allowed_origin=allowed_origin):
        shown = draw_page.draw_and_read(images[3])
        assert (shown.error, shown.digit) == ("", str(labels[3]))
