"""The pendant page in a real browser (Debian's chromium, headless, driven by playwright): it
loads, connects (on its own origin, so behind a proxy too), and a click on "success" becomes a
committed event on the episode's last transition, acknowledged on the page; it shows the
watched robot's camera frames and the chart of mean return per policy version, live. The
README's picture, docs/pendant.png, is made by scripts/pendant_screenshot.py."""

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.reward_bridge.conftest import (
    OPERATORS,
    add_observation,
    add_transitions,
    jpeg_close,
    scene,
)

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    # Missing chromium is a failure, not a skip: CI must run this (make test installs it).
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_click_success_commits_on_the_last_transition_and_shows_the_ack(
    browser, make_bridge, replay, tmp_path
):
    ids = add_transitions(replay, "arm-1", "ep-42", 5)
    add_transitions(replay, "arm-2", "ep-9", 2)
    bridge = make_bridge()
    page = browser.new_page(viewport={"width": 412, "height": 915})  # a phone screen
    page.goto(f"http://127.0.0.1:{bridge.ws_port}/#token={OPERATORS['ana']}")
    page.wait_for_selector("#conn[data-state=connected]", timeout=15_000)
    page.select_option("#robot", "arm-1")
    page.wait_for_function("document.getElementById('s-episode').textContent === 'ep-42'")
    assert page.text_content("#s-step") == "4" and page.text_content("#s-version") == "3"

    page.click("#btn-success")
    page.wait_for_function("document.getElementById('ack').textContent.includes('stored')")
    assert f"transition {ids[-1]}" in page.text_content("#ack")
    with sqlite3.connect(replay.root / "replay.sqlite") as conn:
        rows = conn.execute(
            "SELECT kind, value, operator, transition_id FROM reward_events"
        ).fetchall()
        ended = conn.execute("SELECT ended FROM episodes WHERE episode_id = 'ep-42'").fetchone()
    assert rows == [("success", 1.0, "ana", ids[-1])] and ended == (1,)

    page.keyboard.press("+")  # keypad: a step reward
    page.wait_for_function("document.getElementById('ack').textContent.includes('step_reward')")
    page.wait_for_function("document.querySelectorAll('#recent li').length === 2")
    shot = tmp_path / "pendant.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.close()


PIXELS_JS = """async (sel) => {
  const img = document.querySelector(sel);
  await img.decode();
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return [c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];
}"""


def shown_pixels(page, camera: str, transition_id: int) -> np.ndarray:
    """The pixels chromium decoded for the page's <img> of `camera`, once it shows that
    transition's frame: uint8 [H, W, 3]."""
    sel = f'#frames img[data-camera="{camera}"][data-transition="{transition_id}"]'
    page.wait_for_selector(sel, state="attached", timeout=15_000)
    w, h, rgba = page.evaluate(PIXELS_JS, sel)
    return np.asarray(rgba, np.uint8).reshape(h, w, 4)[..., :3]


def test_the_page_shows_the_robot_s_last_image_and_a_point_per_version(
    browser, make_bridge, replay
):
    """The frame in the page matches the robot's last stored image within JPEG loss
    (`jpeg_close`), and the chart has one point per version with ended episodes; both update
    live as the robot goes on."""
    for version in (1, 2, 3):  # two ended episodes per version
        for ep in range(2):
            obs = {"top": scene(96, 128, shift=10 * version + ep)}
            add_observation(
                replay, "arm-1", f"ep-{version}-{ep}", 0, obs, version, 5.0 * version + ep, True
            )
    top, wrist = scene(96, 128, shift=50), scene(64, 64, shift=5)
    tid = add_observation(replay, "arm-1", "ep-live", 0, {"top": top, "wrist": wrist}, 3)
    bridge = make_bridge(frame_interval_s=0.1, returns_interval_s=0.1)
    page = browser.new_page(viewport={"width": 412, "height": 915})
    page.goto(f"http://127.0.0.1:{bridge.ws_port}/#token={OPERATORS['ana']}")
    page.wait_for_selector("#conn[data-state=connected]", timeout=15_000)
    page.select_option("#robot", "arm-1")
    shown = shown_pixels(page, "top", tid)
    assert jpeg_close(shown, top) and not jpeg_close(shown, scene(96, 128, shift=80))
    assert jpeg_close(shown_pixels(page, "wrist", tid), wrist)
    assert page.text_content("#frame-note").startswith("step 0 · ")  # and how old it is
    page.wait_for_function("document.querySelectorAll('#chart circle.pt').length === 3")
    means = page.eval_on_selector_all("#chart circle.pt", "cs => cs.map(c => +c.dataset.mean)")
    assert means == [5.5, 10.5, 15.5]

    # The robot goes on: a version-4 episode ends and a new picture is stored.
    later = scene(96, 128, shift=80)
    obs = {"top": later, "wrist": wrist}
    tid2 = add_observation(replay, "arm-1", "ep-4", 0, obs, 4, 30.0, True)
    assert jpeg_close(shown_pixels(page, "top", tid2), later)
    page.wait_for_function("document.querySelectorAll('#chart circle.pt').length === 4")
    page.close()


def test_a_robot_without_a_camera_says_so(browser, make_bridge, replay):
    tid = add_observation(replay, "arm-1", "ep-1", 0, {"state": np.ones(4, np.float32)})
    bridge = make_bridge(frame_interval_s=0.1)
    page = browser.new_page(viewport={"width": 412, "height": 915})
    page.goto(f"http://127.0.0.1:{bridge.ws_port}/#token={OPERATORS['ana']}")
    page.wait_for_function(
        "document.getElementById('frame-note').textContent.includes('no camera image')"
    )
    assert f"transition {tid}" in page.text_content("#frame-note")
    assert page.query_selector_all("#frames img") == []
    assert page.text_content("#chart-note") == "no ended episode yet"
    page.close()


def test_a_refused_token_asks_for_another_and_stores_nothing(browser, make_bridge, replay):
    add_transitions(replay, "arm-1", "ep-1", 1)
    bridge = make_bridge()
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{bridge.ws_port}/#token=not-a-token")
    page.wait_for_selector("#conn[data-state=refused]", timeout=15_000)
    page.click("#btn-success")
    assert page.is_visible("#login") and "stored" not in page.text_content("#ack")
    with sqlite3.connect(replay.root / "replay.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM reward_events").fetchone() == (0,)
    page.fill("#token", OPERATORS["bob"])
    page.click("#login button")
    page.wait_for_selector("#conn[data-state=connected]", timeout=15_000)
    assert page.text_content("#operator") == "bob"
    page.close()


def test_the_page_reconnects_after_the_bridge_restarts(browser, make_bridge, replay, tmp_path):
    add_transitions(replay, "arm-1", "ep-1", 2)
    first = make_bridge()
    port = first.ws_port
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/#token={OPERATORS['ana']}")
    page.wait_for_selector("#conn[data-state=connected]", timeout=15_000)
    first.close()
    page.wait_for_selector("#conn[data-state=connecting]", timeout=15_000)
    make_bridge(ws_port=port)
    page.wait_for_selector("#conn[data-state=connected]", timeout=30_000)
    page.close()


@pytest.fixture
def forwarder():
    """A TCP forwarder on a port of its own (the TLS proxy's stand-in, minus TLS): every
    connection's first line is recorded, and an X-Forwarded-For naming the client is added
    to each request head, as deploy/nginx-openpi-rl-bridge.conf does."""
    stops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def start(target_port: int) -> tuple[int, list[bytes]]:
        seen: list[bytes] = []
        ready = threading.Event()
        port: list[int] = []

        async def pipe(reader, writer):
            try:
                with contextlib.suppress(ConnectionError):
                    while data := await reader.read(65536):
                        writer.write(data)
                        await writer.drain()
            finally:  # cancelled when the forwarder stops, too: the bridge then sees EOF
                writer.close()

        async def on_client(reader, writer):
            head = await reader.readuntil(b"\r\n")
            seen.append(head)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
            up_writer.write(head + b"X-Forwarded-For: 192.0.2.7\r\n")
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def main():
            server = await asyncio.start_server(on_client, "127.0.0.1", 0)
            port.append(server.sockets[0].getsockname()[1])
            stop = asyncio.Event()
            stops.append((asyncio.get_running_loop(), stop))
            ready.set()
            async with server:
                await stop.wait()

        threading.Thread(target=asyncio.run, args=(main(),), daemon=True).start()
        ready.wait(10)
        return port[0], seen

    yield start
    for loop, stop in stops:
        loop.call_soon_threadsafe(stop.set)


def test_the_page_behind_a_proxy_connects_through_its_own_origin(
    browser, make_bridge, replay, forwarder
):
    """Behind the TLS proxy the page is https://bridge.example.org/: its WebSocket must go to
    that origin too, not to the bridge's own port (unreachable from the pendant network)."""
    add_transitions(replay, "arm-1", "ep-1", 1)
    bridge = make_bridge(trusted_proxies=("127.0.0.1",))
    port, seen = forwarder(bridge.ws_port)
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/#token={OPERATORS['ana']}")
    page.wait_for_selector("#conn[data-state=connected]", timeout=15_000)
    assert any(line.startswith(b"GET /pendant ") for line in seen), seen
    assert [s.peer for s in bridge.ws_slots] == ["192.0.2.7"]  # the forwarded client's share
    page.close()
