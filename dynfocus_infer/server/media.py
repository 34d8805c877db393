"""A video_url -> a local file the engine can decode, within the server's rules:

- a path or file:// URL: only under --allowed-local-media-path, after resolving `..` and symlinks (no escape);
- data:video/...;base64,...: decoded (strictly) into a private temporary file, at most max_video_bytes;
- http(s)://: refused unless --allow-remote-media, then fetched with the size and time limits.

Temporary files live in one MediaStore folder, removed when their request ends (release) and the folder at close.
"""
from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .api_errors import APIError, bad_request
from .settings import ServerSettings

DATA_VIDEO_PREFIX = "data:video/"


@dataclass
class LocalVideo:
    path: str
    temporary: bool
    label: str  # how messages name it: the client's path or URL, never a temporary file's name

    def release(self) -> None:
        if self.temporary:
            Path(self.path).unlink(missing_ok=True)


class MediaStore:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.folder = Path(tempfile.mkdtemp(prefix="dynfocus-serve-"))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def open(self, url: str) -> "LocalVideo":
        """The local file of `url` (blocking: remote fetches and base64 decoding run here; call it in a thread).
        release() the result when the request ends."""
        if url.startswith("data:"):
            return LocalVideo(str(self._from_data_url(url)), temporary=True, label="the data URL's video")
        if url.startswith(("http://", "https://")):
            return LocalVideo(str(self._fetch(url)), temporary=True, label=f"video {url!r:.200}")
        return LocalVideo(self._local(url), temporary=False, label=f"video {url!r:.200}")

    def _local(self, url: str) -> str:
        allowed = self.settings.allowed_local_media_path
        if url.startswith("file://"):
            parsed = urllib.parse.urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise bad_request(f"file URL {url!r:.200}: only local files (file:///path)", code="invalid_video_url")
            path = urllib.parse.unquote(parsed.path)
        elif "://" in url:
            raise bad_request(f"video URL scheme of {url!r:.200} is not supported: use a path, file://, "
                              f"data:video/...;base64, or http(s):// (when enabled)", code="invalid_video_url")
        else:
            path = url
        if allowed is None:
            raise APIError(403, "local video files are not readable by this server: start it with "
                                "--allowed-local-media-path DIR to allow the files under DIR", "local_media_disabled")
        real = os.path.realpath(path)
        if os.path.commonpath([real, allowed]) != allowed:
            raise APIError(403, f"video {path!r:.200} is outside the allowed folder {allowed} (after resolving "
                                f"'..' and symbolic links)", "media_path_not_allowed")
        if not os.path.isfile(real):
            raise bad_request(f"video {path!r:.200} is not a file under the allowed folder", code="video_not_found")
        return real

    def _new_file(self):
        return tempfile.NamedTemporaryFile(dir=self.folder, suffix=".video", delete=False)

    def _from_data_url(self, url: str) -> Path:
        header, comma, payload = url.partition(",")
        if not comma or not header.startswith(DATA_VIDEO_PREFIX) or not header.endswith(";base64"):
            raise bad_request("a data URL video must read data:video/<type>;base64,<data>", code="invalid_video_url")
        limit = self.settings.max_video_bytes
        if len(payload) * 3 // 4 > limit + 3:
            raise APIError(413, f"video of about {len(payload) * 3 // 4:,} bytes is over this server's limit of "
                                f"{limit:,} (--max-video-bytes)", "video_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise bad_request(f"the data URL's base64 is malformed: {error}", code="invalid_video_url") from error
        if not data:
            raise bad_request("the data URL holds no video bytes", code="invalid_video_url")
        with self._new_file() as f:
            f.write(data)
        return Path(f.name)

    def _fetch(self, url: str) -> Path:
        if not self.settings.allow_remote_media:
            raise bad_request(f"remote video URLs are disabled on this server ({url!r:.200}): send the video as a "
                              f"data URL, or start the server with --allow-remote-media", code="remote_media_disabled")
        limit, chunk = self.settings.max_video_bytes, 1 << 20
        deadline = time.monotonic() + self.settings.remote_timeout_s
        f = self._new_file()
        try:
            with f, urllib.request.urlopen(url, timeout=self.settings.remote_timeout_s) as response:
                size = 0
                while block := response.read(chunk):
                    size += len(block)
                    if size > limit:
                        raise APIError(413, f"video at {url!r:.200} is over this server's limit of {limit:,} bytes "
                                            f"(--max-video-bytes)", "video_too_large")
                    if time.monotonic() > deadline:
                        raise bad_request(f"fetching video {url!r:.200} took over {self.settings.remote_timeout_s} s",
                                          code="video_fetch_timeout")
                    f.write(block)
        except APIError:
            Path(f.name).unlink(missing_ok=True)
            raise
        except (OSError, ValueError) as error:  # URLError, HTTPError, timeouts are OSErrors
            Path(f.name).unlink(missing_ok=True)
            raise bad_request(f"could not fetch video {url!r:.200}: {error}", code="video_fetch_failed") from error
        return Path(f.name)
