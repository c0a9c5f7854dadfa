"""`teeflow dashboard`: pages over a real cluster, the attacks on a page that acts with the
user's key, and a real headless Chromium driving a task from submit to result."""

from __future__ import annotations

import html
import re
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from teeflow.cli.cluster import LocalCluster, Party
from teeflow.cli.demo import make_party_data
from teeflow.dashboard.app import create_app
from teeflow.sdk import Client
from tests.factories import appraisal_policy

pytestmark = pytest.mark.e2e
HOST = "127.0.0.1:5555"  # what the TestClient's requests say in Host; nothing listens there
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler, an executor, and grace, an owner with no approval rule."""
    work = tmp_path_factory.mktemp("dash")
    party = Party("grace", "by_hand", work / "grace.csv")
    make_party_data(party.path, 300, seed=2)
    with LocalCluster(work) as c:
        c.start_scheduler()
        c.start_executor()
        config = c.write_provider_config(party, approve=False, poll_wait=1)
        c._spawn("provider-grace", "provider", "--config", str(config))
        c.wait_for_datasets([party.dataset])
        c.wait_for_executor(c.executor_address)
        yield c


def _page(client: Client) -> TestClient:
    app = create_app(client, HOST)
    web = TestClient(app, base_url=f"http://{HOST}")
    assert web.get(f"/?token={app.state.token}", follow_redirects=False).status_code == 303
    return web


def _csrf(web: TestClient, path: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', web.get(path).text)
    assert found, path
    return found.group(1)


def _wait(web: TestClient, task_id: str, state: str) -> None:
    deadline = time.monotonic() + 120
    while f"<b id=state>{state}</b>" not in web.get(f"/tasks/{task_id}").text:
        assert time.monotonic() < deadline, f"task {task_id} never reached {state}"
        time.sleep(0.3)


def _shown_version(page: str) -> str:
    found = re.search(r'<script src="/live.js" data-version="([0-9a-f]{64})">', page)
    assert found, "a live page names the version it shows"
    return found.group(1)


def _clients(c: LocalCluster) -> tuple[Client, Client]:
    return (Client(c.scheduler_url, key=c.initiator_key, policy=appraisal_policy()),
            Client(c.scheduler_url, key=c.workdir / "grace.key", policy=appraisal_policy()))


def test_submit_approve_result_through_the_pages(cluster):
    mine, grace = _clients(cluster)
    with mine, grace:
        me, owner = _page(mine), _page(grace)
        sent = me.post("/submit", data={"csrf": _csrf(me, "/submit"), "ds_by_hand": "1",
                                        "compute": "logistic_regression",
                                        "params": "label=y"}, follow_redirects=False)
        assert sent.status_code == 303, sent.text
        task_id = sent.headers["location"].rsplit("/", 1)[1]
        page = me.get(f"/tasks/{task_id}").text
        assert "grace (approval)" in page and "signer verified by you" in page
        before = _shown_version(page)
        assert task_id in owner.get("/approvals").text
        shown = html.unescape(owner.get(f"/approve/{task_id}").text)
        assert "'logistic_regression'" in shown and "'by_hand' owned by 'grace'" in shown
        digest = re.search(r'name="digest" value="([0-9a-f]+)"', shown).group(1)
        # a digest other than the one shown is not signed
        other = owner.post(f"/approve/{task_id}", data={
            "csrf": _csrf(owner, f"/approve/{task_id}"), "decision": "approved",
            "digest": "00" * 32})
        assert other.status_code == 400 and "changed after it was shown" in other.text
        done = owner.post(f"/approve/{task_id}", data={
            "csrf": _csrf(owner, f"/approve/{task_id}"), "decision": "approved",
            "digest": digest}, follow_redirects=False)
        assert done.status_code == 303
        assert task_id not in owner.get("/approvals").text
        _wait(me, task_id, "done")
        # a page made before the change watches the version it showed: /live differs, so
        # it reloads (even when the change came as it loaded); a fresh page is current
        assert me.get("/live").json()["version"] != before
        deadline = time.monotonic() + 30  # (entries may still land between the two GETs)
        while _shown_version(me.get(f"/tasks/{task_id}").text) != \
                me.get("/live").json()["version"]:
            assert time.monotonic() < deadline, "a fresh page is never current"
            time.sleep(0.3)
        taken = me.post(f"/tasks/{task_id}/result",
                        data={"csrf": _csrf(me, f"/tasks/{task_id}/result")})
        assert taken.status_code == 200 and "SIMULATED TEE" in taken.text
        assert '"n_samples": 300' in html.unescape(taken.text)
        assert "log OK" in me.get("/audit").text
        assert "accepted" in me.get("/executors").text
        data = html.unescape(owner.get("/datasets").text)
        assert "by_hand" in data and "y: int64" in data


def test_attacks_on_the_key_holding_pages(cluster):
    """A page elsewhere cannot drive the dashboard: no token, no CSRF token, another Host
    (DNS rebinding) or Origin are each refused, and the task is left as it was."""
    mine, grace = _clients(cluster)
    with mine, grace:
        task = mine.submit(["by_hand"], None, "logistic_regression", {"label": "y"})
        task_id = task["id"]
        owner = _page(grace)
        shown = owner.get(f"/approve/{task_id}").text
        digest = re.search(r'name="digest" value="([0-9a-f]+)"', shown).group(1)
        csrf = _csrf(owner, f"/approve/{task_id}")
        form = {"decision": "approved", "digest": digest}
        # the browser sends the cookie, but the forging page cannot read the CSRF token
        assert owner.post(f"/approve/{task_id}", data=form).status_code == 403
        assert owner.post(f"/approve/{task_id}",
                          data={**form, "csrf": "guess"}).status_code == 403
        # no cookie at all (another browser profile, curl from another user)
        stranger = TestClient(owner.app, base_url=f"http://{HOST}")
        assert stranger.post(f"/approve/{task_id}",
                             data={**form, "csrf": csrf}).status_code == 403
        assert stranger.get("/approvals").status_code == 403
        # DNS rebinding: evil.example resolves to 127.0.0.1, the browser says its name
        rebound = owner.get("/approvals", headers={"host": "evil.example:5555"})
        assert rebound.status_code == 421
        assert owner.post(f"/approve/{task_id}", data={**form, "csrf": csrf},
                          headers={"host": "evil.example:5555"}).status_code == 421
        assert owner.post(f"/approve/{task_id}", data={**form, "csrf": csrf},
                          headers={"origin": "http://evil.example"}).status_code == 403
        assert mine.task(task_id)["state"] == "submitted"
        # no CORS: a cross-origin read of any page is not allowed by the browser
        answer = owner.get("/live", headers={"origin": "http://evil.example"})
        assert not any(h.lower().startswith("access-control") for h in answer.headers)
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        # with the token and the page's CSRF token it goes through
        ok = owner.post(f"/approve/{task_id}", data={**form, "csrf": csrf},
                        follow_redirects=False)
        assert ok.status_code == 303
        mine.cancel(task_id)


def test_every_value_is_escaped(cluster):
    """A dataset name the scheduler reports is text, never markup."""
    from teeflow.dashboard.html import fmt, table

    hostile = '<script>alert(1)</script>"'
    out = table(("name",), [(hostile,)]) + fmt('<a title="{}">x</a>', hostile)
    assert "<script>" not in out and "&lt;script&gt;" in out and '"&quot;' not in out[:0]
    assert 'title="&lt;script&gt;alert(1)&lt;/script&gt;&quot;"' in out


def _dashboard(c: LocalCluster, name: str, key: Path) -> str:
    """Start `teeflow dashboard` as a user does; the URL (with its token) it printed."""
    port_file = c.workdir / f"{name}.port"
    policy = c.workdir / "grace.toml"  # its [policy] accepts this tree's simulated executor
    c._spawn(name, "dashboard", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
             "--policy", str(policy), "--key", str(key), "--scheduler", c.scheduler_url)
    address = c._wait_port(name, port_file)
    log = c.workdir / "logs" / f"{name}.log"
    deadline = time.monotonic() + 30
    while (found := re.search(r"open (http://\S+)", log.read_text())) is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert address in found.group(1)
    return found.group(1)


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (make sysdeps as root)")
def test_browser_submit_approve_result(cluster, tmp_path):
    pytest.importorskip("selenium", reason="needs selenium (the dev extras)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    c = cluster
    mine_url = _dashboard(c, "dash-initiator", c.initiator_key)
    owner_url = _dashboard(c, "dash-grace", c.workdir / "grace.key")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        def shot(name: str) -> None:
            browser.save_screenshot(str(tmp_path / f"{name}.png"))

        def until(check, what: str) -> None:
            deadline = time.monotonic() + 120
            while not check():
                assert time.monotonic() < deadline, f"never: {what}: {browser.page_source}"
                time.sleep(0.3)

        browser.get(mine_url)
        browser.get(mine_url.split("/?")[0] + "/submit")
        browser.find_element(By.NAME, "ds_by_hand").click()
        browser.find_element(By.ID, "params").send_keys("label=y")
        shot("1-submit")
        browser.find_element(By.ID, "submit").click()
        until(lambda: "/tasks/" in browser.current_url, "the task page")
        task_id = browser.current_url.rsplit("/", 1)[1]
        until(lambda: "grace (approval)" in browser.page_source, "grace awaited")
        shot("2-awaiting")

        owner = owner_url.split("/?")[0]
        browser.get(owner_url)  # another origin (port): its own cookie
        browser.get(owner + "/approvals")
        browser.find_element(By.LINK_TEXT, task_id).click()
        assert "owned by 'grace'" in browser.page_source
        shot("3-approve")
        browser.find_element(By.ID, "approve").click()
        until(lambda: "/tasks/" in browser.current_url, "back on the task page")

        mine = mine_url.split("/?")[0]
        browser.get(f"{mine}/tasks/{task_id}")
        # the page reloads itself (live.js) as the task moves on
        until(lambda: "<b id=\"state\">done</b>" in browser.page_source
              or "<b id=state>done</b>" in browser.page_source, "done, live")
        shot("4-done")
        browser.get(f"{mine}/tasks/{task_id}/result")
        browser.find_element(By.ID, "take").click()
        until(lambda: browser.find_elements(By.ID, "result"), "the result")
        assert '"n_samples": 300' in browser.find_element(By.ID, "result").text
        shot("5-result")
    finally:
        browser.quit()
        c.stop_process("dash-initiator")
        c.stop_process("dash-grace")
    assert all((tmp_path / f"{n}.png").stat().st_size > 0 for n in
               ("1-submit", "2-awaiting", "3-approve", "4-done", "5-result"))
