"""The pendant page in a real browser (Debian's chromium, headless, driven by playwright): it
loads, connects (on its own origin, so behind a proxy too), and a click on "success" becomes a
committed event on the episode's last transition, acknowledged on the page. Its screenshot is
docs/pendant.png."""

import asyncio
import contextlib
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from tests.reward_bridge.conftest import OPERATORS, add_transitions

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).parents[2] / "docs"
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
    if os.environ.get("UPDATE_DOCS") or not (DOCS / "pendant.png").exists():
        DOCS.mkdir(exist_ok=True)  # the README's picture: UPDATE_DOCS=1 to refresh it
        shutil.copy(shot, DOCS / "pendant.png")
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
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
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
