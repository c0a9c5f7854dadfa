"""A provider asks the executor's status before an upload only when it takes up an upload it
began before (its ledger holds a run it claimed for that executor): a first upload costs no
status RPC. A real executor over loopback Flight that counts what it is asked."""

from __future__ import annotations

from collections import Counter

from teeflow.core.crypto import KeySigner
from tests.test_flight import CountingServer, _create, _item, _policy, _provider


class AskedServer(CountingServer):
    """Counts each action by name too."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: Counter[str] = Counter()

    def do_action(self, context, action):
        self.asked[action.type] += 1
        return super().do_action(context, action)


def test_a_first_upload_does_not_ask_the_executor_its_status(serve, tmp_path):
    server = AskedServer()
    running = serve(server)
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = _create(server, owner, initiator)
    node = _provider(tmp_path, _policy(), owner)
    node.signed.record(spec, "owner")  # as its decide() records
    receipt = node.handle(_item(spec, owner, running.address))
    assert receipt is not None and receipt["rows"] == 2 and server.puts == 1
    assert server.asked["status"] == 0, server.asked


def test_an_upload_taken_up_again_asks_and_keeps_its_run(serve, tmp_path):
    """The node claimed run 1 for this executor, then stopped before a byte left: taken up
    again, it asks the executor (on run 1, holding nothing of it) and keeps that run."""
    server = AskedServer()
    running = serve(server)
    owner, initiator = KeySigner.generate(), KeySigner.generate()
    spec = _create(server, owner, initiator)
    node = _provider(tmp_path, _policy(), owner)
    node.signed.record(spec, "owner")
    assert node.ledger.claim(spec, "d1", server.executor.tls_spki_hash.hex()) == 1
    receipt = node.handle(_item(spec, owner, running.address))
    assert receipt is not None and receipt["rows"] == 2 and server.puts == 1
    assert server.asked["status"] == 1, server.asked
    assert [u["run"] for u in node.ledger.uploads(spec.digest())] == [1]  # not a second run
