"""The OpenAI-compatible server, live on a free localhost port, driven by the official `openai` package and by raw
HTTP: chat with videos (path, file://, data URL), streaming or not, n = 2, logprobs, stop strings; greedy text
equal to LLM.chat on the same conversation; concurrent streams unmixed; a client gone mid-stream frees its
capacity; every bad input with its status and OpenAI-shaped error; focus requests (the engine's extension) report
what focus did, streamed or not."""
import base64
import concurrent.futures
import json
import os
import socket
import threading
import time

import httpx2 as httpx
import pytest
import uvicorn
from openai import APIStatusError, OpenAI

from dynfocus_infer.core.async_llm import AsyncLLM
from dynfocus_infer.engine import LLM
from dynfocus_infer.sampling import SamplingParams
from dynfocus_infer.server import ServerSettings, build_app
from dynfocus_infer.video import write_test_video

KEY = "test-key"
MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    write_test_video(allowed / "clip.mp4", num_frames=24, fps=8)
    write_test_video(root / "secret.mp4", num_frames=16, fps=8)
    os.symlink(root / "secret.mp4", allowed / "link.mp4")
    return {"root": root, "allowed": allowed, "clip": allowed / "clip.mp4", "secret": root / "secret.mp4"}


@pytest.fixture(scope="module")
def server(media):
    engine = AsyncLLM(LLM(MODEL, num_frames=4, cluster_backend="reference"))
    settings = ServerSettings(port=_free_port(), api_key=KEY, served_model_name=MODEL,
                              allowed_local_media_path=str(media["allowed"]), max_video_bytes=200_000,
                              max_request_bytes=400_000)
    config = uvicorn.Config(build_app(engine, settings), host="127.0.0.1", port=settings.port, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{settings.port}", "engine": engine}
    http.should_exit = True
    thread.join(timeout=30)
    engine.shutdown()


@pytest.fixture(scope="module")
def reference():
    return LLM(MODEL, num_frames=4, cluster_backend="reference")


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _conversation(question: str, video_url=None) -> list:
    content = [{"type": "text", "text": question}]
    if video_url is not None:
        content = [{"type": "video_url", "video_url": {"url": video_url}}, *content]
    return [{"role": "user", "content": content}]


def _reference_text(reference, question, video_path=None, **params) -> str:
    content = [{"type": "text", "text": question}]
    if video_path is not None:
        content = [{"type": "video", "video": str(video_path)}, *content]
    out = reference.chat([{"role": "user", "content": content}], SamplingParams(temperature=0.0, **params))[0]
    assert out.ok, out.error
    return out.text


def _idle(engine, timeout_s=20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine.num_unfinished_requests == 0 and engine.engine.blocks.num_used == 0:
            return True
        time.sleep(0.05)
    return False


def test_chat_with_a_video_by_path_file_url_and_data_url_equals_llm_chat(client, media, reference):
    expected = _reference_text(reference, "What happens?", media["clip"], max_tokens=8)
    data_url = "data:video/mp4;base64," + base64.b64encode(media["clip"].read_bytes()).decode()
    for index, url in enumerate((str(media["clip"]), media["clip"].as_uri(), data_url)):
        reply = client.chat.completions.create(model=MODEL, messages=_conversation("What happens?", url),
                                               max_tokens=8, temperature=0)
        cached = reply.usage.prompt_tokens_details.cached_tokens
        if index:    # the same prompt again: all of it but the last (partial) KV block of 16 comes from the cache
            assert reply.usage.prompt_tokens - 16 <= cached < reply.usage.prompt_tokens, cached
        assert reply.choices[0].message.content == expected, url[:40]
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"
        video = reply.model_extra["video"]
        assert video["frames"] == 4 and 1 <= video["visual_tokens"] < video["full_visual_tokens"]
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_equals_the_whole_reply_and_reports_usage(client, media, reference):
    expected = _reference_text(reference, "Describe it.", media["clip"], max_tokens=10)
    stream = client.chat.completions.create(model=MODEL, messages=_conversation("Describe it.", str(media["clip"])),
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected
    assert finish in ("length", "stop") and usage is not None and usage.completion_tokens >= 1


@pytest.mark.parametrize("mode", ["llm", "dpe"])
def test_chat_with_focus_equals_llm_chat_with_focus_and_reports_it(server, client, media, reference, monkeypatch,
                                                                   mode):
    """The body's `focus` reaches the engine as LLM.chat(focus=...) would send it; the reply, streamed with or
    without usage or not streamed, carries its FocusInfo. (The tiny model's grounding answer is meaningless:
    pass 1 answers "from 20 to 50" here, as in tests/test_focus_engine.py.)"""
    from dynfocus_infer.core.focus_stage import FocusStage
    monkeypatch.setattr(FocusStage, "_grounding_text", staticmethod(lambda state: "from 20 to 50"))
    messages = _conversation("What happens?", str(media["clip"]))
    want = reference.chat([{"role": "user", "content": [{"type": "video", "video": str(media["clip"])},
                                                        {"type": "text", "text": "What happens?"}]}],
                          SamplingParams(temperature=0.0, max_tokens=6), focus=mode)[0]
    assert want.ok and want.focus.dense_frames, want.error
    focus = json.loads(json.dumps(want.focus.to_dict()))
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"focus": mode})
    assert reply.choices[0].message.content == want.text
    assert reply.model_extra["focus"] == focus and reply.usage.prompt_tokens == want.tokens.prompt_tokens
    for include_usage in (False, True):
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                stream=True, extra_body={"focus": mode},
                                                stream_options={"include_usage": True} if include_usage else None)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        carrying = [c for c in chunks if "focus" in (c.model_extra or {})]
        assert [c.model_extra["focus"] for c in carrying] == [focus]
        if include_usage:   # on the usage chunk (no choices, as OpenAI sends it)
            assert carrying[0] is chunks[-1] and not chunks[-1].choices and chunks[-1].usage is not None
        else:               # on the last chunk, which ends the answer: no chunk without choices
            assert carrying[0] is chunks[-1] and all(c.choices for c in chunks)
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert "focus" not in plain.model_extra
    assert _idle(server["engine"])


def test_n_two_seeded_completions_and_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=_conversation("Say something."), max_tokens=6,
                                           temperature=1.0, seed=7, n=2, logprobs=True, top_logprobs=3)
    assert [c.index for c in reply.choices] == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=_conversation("Say something."), max_tokens=6,
                                           temperature=1.0, seed=7, n=2, logprobs=True, top_logprobs=3)
    assert [c.message.content for c in reply.choices] == [c.message.content for c in again.choices]
    for choice in reply.choices:
        content = choice.logprobs.content
        assert len(content) == reply.usage.completion_tokens // 2 or len(content) >= 1
        for entry in content:
            assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 3
            ranked = [t.logprob for t in entry.top_logprobs]
            assert ranked == sorted(ranked, reverse=True)
            assert entry.logprob <= ranked[0] + 1e-6


def test_stop_strings_cut_the_text(client, reference):
    full = _reference_text(reference, "Count to ten.", max_tokens=12)
    assert len(full) >= 4
    stop = full[2:4]
    reply = client.chat.completions.create(model=MODEL, messages=_conversation("Count to ten."), max_tokens=12,
                                           temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_text_completions_and_models(client, reference):
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    expected = reference.generate([{"prompt": "Once upon a time"}], SamplingParams(max_tokens=5))[0].text
    assert reply.choices[0].text == expected
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_thirty_two_concurrent_streams_complete_unmixed(server, reference):
    questions = [f"Question number {i}: what comes next?" for i in range(32)]
    expected = [o.text for o in reference.chat([_conversation(q) for q in questions],
                                               SamplingParams(max_tokens=6, temperature=0.0))]

    def one(question):
        local = OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        stream = local.chat.completions.create(model=MODEL, messages=_conversation(question), max_tokens=6,
                                               temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        texts = list(pool.map(one, questions, timeout=600))
    assert texts == expected
    assert _idle(server["engine"])


def test_a_client_gone_mid_stream_frees_its_capacity_and_spares_the_others(server, client, reference):
    engine = server["engine"]
    body = {"model": MODEL, "messages": _conversation("Tell a very long story."), "max_tokens": 400,
            "temperature": 0, "stream": True}
    expected = _reference_text(reference, "Be brief.", max_tokens=6)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        other = pool.submit(lambda: client.chat.completions.create(
            model=MODEL, messages=_conversation("Be brief."), max_tokens=6, temperature=0).choices[0].message.content)
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                received = [line for _, line in zip(range(4), lines) if line.startswith("data:")]
                assert received
                assert engine.engine.blocks.num_used > 0
        assert other.result(timeout=120) == expected
    assert _idle(engine), "the abandoned stream still holds KV blocks"


def _post(server, path, body=None, *, raw=None, key=KEY, headers=None):
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server["url"] + path, content=content,
                      headers={"Content-Type": "application/json", **headers}, timeout=120)


def _error(response, status):
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    return error


@pytest.mark.parametrize("case,status,words", [
    ("malformed_json", 400, "malformed JSON"),
    ("wrong_type", 400, "max_tokens"),
    ("unknown_field", 400, "unknown field 'frobnicate'"),
    ("unknown_model", 404, "does not exist"),
    ("bad_key", 401, "API key"),
    ("outside", 403, "outside the allowed folder"),
    ("dotdot", 403, "outside the allowed folder"),
    ("symlink", 403, "outside the allowed folder"),
    ("random_bytes", 400, "video"),
    ("not_base64", 400, "base64"),
    ("oversized_body", 413, "over this server's limit"),
    ("oversized_video", 413, "--max-video-bytes"),
    ("remote", 400, "remote video URLs are disabled"),
    ("temperature", 400, "temperature"),
    ("focus_value", 400, "focus"),
    ("focus_no_video", 400, "focus: focus = 'llm' needs a question and a video"),
    ("focus_on_completions", 400, "unknown field 'focus'"),
])
def test_bad_inputs_get_their_status_and_message(server, media, case, status, words):
    good = {"model": MODEL, "messages": _conversation("Hi"), "max_tokens": 2}
    video = lambda url: {**good, "messages": _conversation("Hi", url)}  # noqa: E731
    random_video = "data:video/mp4;base64," + base64.b64encode(os.urandom(5000)).decode()
    requests = {
        "malformed_json": dict(raw=b'{"model": "tiny", "messages": ['),
        "wrong_type": dict(body={**good, "max_tokens": "many"}),
        "unknown_field": dict(body={**good, "frobnicate": 1}),
        "unknown_model": dict(body={**good, "model": "gpt-9"}),
        "bad_key": dict(body=good, key="wrong"),
        "outside": dict(body=video(str(media["secret"]))),
        "dotdot": dict(body=video(str(media["allowed"] / ".." / "secret.mp4"))),
        "symlink": dict(body=video(str(media["allowed"] / "link.mp4"))),
        "random_bytes": dict(body=video(random_video)),
        "not_base64": dict(body=video("data:video/mp4;base64,@@@not-base64@@@")),
        "oversized_body": dict(body=video("data:video/mp4;base64," + "A" * 500_000)),
        "oversized_video": dict(body=video("data:video/mp4;base64," + "A" * 360_000)),
        "remote": dict(body=video("http://127.0.0.1:9/video.mp4")),
        "temperature": dict(body={**good, "temperature": -1}),
        "focus_value": dict(body={**video(str(media["clip"])), "focus": "sideways"}),
        "focus_no_video": dict(body={**good, "focus": "llm"}),
        "focus_on_completions": dict(body={"model": MODEL, "prompt": "Hi", "focus": "llm"}),
    }
    path = "/v1/completions" if case == "focus_on_completions" else "/v1/chat/completions"
    error = _error(_post(server, path, **requests[case]), status)
    assert words in error["message"], error
    assert "dynfocus-serve-" not in error["message"], "a temporary file's name leaked into the message"
    assert _idle(server["engine"])


def test_a_prompt_over_the_context_is_a_400_and_the_server_keeps_serving(server, client):
    response = _post(server, "/v1/chat/completions",
                     {"model": MODEL, "messages": _conversation("x" * 100_000), "max_tokens": 2})
    error = _error(response, 400)
    assert "context" in error["message"] or "tokens" in error["message"], error
    assert client.chat.completions.create(model=MODEL, messages=_conversation("Hi"), max_tokens=2).choices


def test_openai_client_raises_with_the_status(client):
    with pytest.raises(APIStatusError) as caught:
        client.chat.completions.create(model="missing-model", messages=_conversation("Hi"), max_tokens=2)
    assert caught.value.status_code == 404


def test_health_and_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=_conversation("Hi"), max_tokens=3, temperature=0)
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    text = httpx.get(server["url"] + "/metrics").text
    for name in ('dynfocus_requests_total{endpoint="/v1/chat/completions",status="200"}',
                 "dynfocus_generation_tokens_total", "dynfocus_time_to_first_token_seconds_count",
                 "dynfocus_time_per_output_token_seconds_bucket", "dynfocus_requests_waiting",
                 "dynfocus_kv_cache_usage_ratio", "dynfocus_prefix_cache_hits_tokens"):
        assert name in text, name
    served = [line for line in text.splitlines() if line.startswith("dynfocus_generation_tokens_total")]
    assert int(float(served[0].split()[-1])) >= 3
