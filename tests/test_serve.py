"""`lorapipe serve`: the merged tiny model on a free local port, talked to over plain HTTP as an OpenAI client talks:
the model list, a whole answer equal to `predict`'s (greedy, the folder's template and stop tokens), the same answer
streamed as server-sent events, bad requests answered 4xx while the server keeps serving, a clean stop on SIGTERM, and
a model without a passed serving-parity check refused."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from lorapipe.hardware.plan import PhasePlan
from lorapipe_app.cli import main
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # merges the session's adapter and starts a server process
QUESTION = [{"role": "user", "content": "What did Apple announce at WWDC25 for developers?"}]


@pytest.fixture(scope="module")
def merged(hf_adapter, tmp_path_factory):
    from lorapipe.phases.merge import merge_adapter

    out = tmp_path_factory.mktemp("served") / "model"
    plan = PhasePlan(phase="merge", device="cpu", dtype="float32", batch_size=1, max_seq_length=128, reason="test")
    check = merge_adapter(hf_adapter["adapter"], str(out), hf_adapter["test"], plan, parity_samples=2,
                          parity_max_new_tokens=4)
    assert check.serving_parity["passed"]
    return out


@pytest.fixture(scope="module")
def server(merged):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lorapipe_app.cli", "serve", str(merged), "--port", "0",
                             "--max-new-tokens", "12"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:  # its own lines: wait for the URL
        found = re.search(r"at (http://[\d.]+:\d+/v1) \(model name '([^']+)'", line)
        if found:
            url, name = found.group(1), found.group(2)
            break
    assert url is not None, f"the server did not start: {proc.stderr.read()[-3000:] if proc.poll() is not None else ''}"
    yield {"proc": proc, "url": url, "name": name}
    if proc.poll() is None:
        proc.kill()


def call(url: str, body: object = None, raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_models_lists_the_served_model(server):
    status, body = call(server["url"] + "/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == server["name"] == "model"


def test_an_answer_is_predicts_and_streams_the_same(server, merged):
    from lorapipe.phases.predict import generate, load_for_inference

    status, body = call(server["url"] + "/chat/completions", {"model": "model", "messages": QUESTION})
    doc = json.loads(body)
    assert status == 200 and doc["object"] == "chat.completion" and doc["model"] == "model"
    answer = doc["choices"][0]
    assert answer["message"]["role"] == "assistant" and answer["finish_reason"] in ("stop", "length")
    assert doc["usage"]["completion_tokens"] <= 12 and doc["usage"]["prompt_tokens"] > 0
    model, tokenizer, _ = load_for_inference(merged, "cpu", "float32")
    assert answer["message"]["content"] == generate(model, tokenizer, QUESTION, max_new_tokens=12)["completion"]

    status, body = call(server["url"] + "/chat/completions", {"messages": QUESTION, "stream": True,
                                                              "stream_options": {"include_usage": True}})
    events = [line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"] == doc["usage"]  # the same tokens counted, streamed or not
    chunks = [json.loads(e) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed.strip() == answer["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["finish_reason"]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "model"}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "gpt-4o", "messages": QUESTION}, 404, "model"),
    (b"{not json", 400, None),
])
def test_a_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(server, body, status, param):
    got, answer = call(server["url"] + "/chat/completions", raw=body if isinstance(body, bytes) else None,
                       body=None if isinstance(body, bytes) else body)
    error = json.loads(answer)["error"]
    assert got == status and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]
    assert call(server["url"] + "/chat/completions", {"messages": QUESTION, "max_tokens": 2})[0] == 200


def test_a_client_that_goes_away_mid_stream_leaves_the_server_serving(server):
    """A streaming client that closes its connection after the first chunk: the server finishes that generation
    (the model answers one request at a time) and answers the next request."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(server["url"])
    body = json.dumps({"messages": QUESTION, "stream": True, "max_tokens": 12}).encode()
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200 OK" in sock.recv(256)
    status, answer = call(server["url"] + "/chat/completions", {"messages": QUESTION, "max_tokens": 3})
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["role"] == "assistant"


def test_sigterm_stops_it_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "stopped" in proc.stderr.read()


def test_a_model_without_a_passed_parity_check_is_refused_unless_told(merged, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    record = json.loads((broken / "lorapipe_merge.json").read_text())
    record["check"]["serving_parity"].update(passed=False, reason="2 of 2 answers part ways")
    (broken / "lorapipe_merge.json").write_text(json.dumps(record))
    assert main(["serve", str(broken), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "not served: its serving-parity check failed: 2 of 2 answers part ways" in err
    assert "--allow-unchecked serves it anyway" in err
