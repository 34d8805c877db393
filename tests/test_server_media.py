"""The server's media rules and admission without a model: remote fetches (when enabled) within their size and
time limits, the queue limit's 503, and ServerSettings' checks."""
import http.server
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dynfocus_infer.errors import ConfigError
from dynfocus_infer.server.api_errors import APIError
from dynfocus_infer.server.app import Server
from dynfocus_infer.server.media import MediaStore
from dynfocus_infer.server.settings import ServerSettings


class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        if self.path == "/slow.mp4":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x" * 1024)
                self.wfile.flush()
                time.sleep(0.05)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    (root / "small.mp4").write_bytes(b"v" * 1000)
    (root / "big.mp4").write_bytes(b"v" * 5000)
    handler = lambda *a, **k: _SlowHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_fetch_when_enabled_keeps_the_bytes_and_cleans_up(web):
    store = MediaStore(ServerSettings(allow_remote_media=True, max_video_bytes=2000))
    video = store.open(f"{web}/small.mp4")
    assert Path(video.path).read_bytes() == b"v" * 1000 and video.temporary
    video.release()
    assert not Path(video.path).exists()
    store.close()
    assert not store.folder.exists()


def test_remote_fetch_limits_size_time_and_failures(web):
    store = MediaStore(ServerSettings(allow_remote_media=True, max_video_bytes=2000, remote_timeout_s=0.5))
    with pytest.raises(APIError) as caught:
        store.open(f"{web}/big.mp4")
    assert caught.value.status == 413
    with pytest.raises(APIError) as caught:
        store.open(f"{web}/slow.mp4")
    assert caught.value.status in (400, 413) and caught.value.code in ("video_fetch_timeout", "video_too_large")
    with pytest.raises(APIError) as caught:
        store.open(f"{web}/missing.mp4")
    assert caught.value.status == 400 and "404" in caught.value.message
    assert list(store.folder.iterdir()) == [], "a failed fetch left its temporary file"
    store.close()


def test_local_files_need_an_allowed_folder(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"v")
    with pytest.raises(APIError) as caught:
        MediaStore(ServerSettings()).open(str(tmp_path / "a.mp4"))
    assert caught.value.status == 403 and "--allowed-local-media-path" in caught.value.message
    store = MediaStore(ServerSettings(allowed_local_media_path=str(tmp_path)))
    assert store.open((tmp_path / "a.mp4").as_uri()).path == str((tmp_path / "a.mp4").resolve())
    with pytest.raises(APIError) as caught:
        store.open(str(tmp_path / "missing.mp4"))
    assert caught.value.status == 400 and caught.value.code == "video_not_found"
    with pytest.raises(APIError) as caught:
        store.open("ftp://example/a.mp4")
    assert caught.value.status == 400 and "scheme" in caught.value.message


def test_queue_full_is_a_503():
    engine = SimpleNamespace(dead_error=None, num_unfinished_requests=3,
                             llm=SimpleNamespace(loaded=SimpleNamespace(tokenizer=None, template=None)))
    server = Server(engine, ServerSettings(max_queued_requests=3))
    with pytest.raises(APIError) as caught:
        server.admit()
    assert caught.value.status == 503 and caught.value.code == "queue_full"
    engine.num_unfinished_requests = 2
    server.admit()


@pytest.mark.parametrize("field,value", [("port", 70000), ("max_video_bytes", 0), ("api_key", ""),
                                         ("allowed_local_media_path", "/no/such/folder"), ("remote_timeout_s", 0)])
def test_settings_name_the_bad_field(field, value):
    with pytest.raises(ConfigError, match=field.replace("_s", "") if field == "remote_timeout_s" else "."):
        ServerSettings(**{field: value})
