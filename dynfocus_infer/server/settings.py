"""What the server listens on, which media it may read, and its limits. Safe by default: localhost only, no local
file readable until a folder is allowed, no remote fetches."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError, is_integer, is_real

MiB = 1 << 20


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None                      # when set, /v1/* needs "Authorization: Bearer <key>"
    served_model_name: str = "dynfocus-smol"          # what /v1/models lists and `model` must name
    allowed_local_media_path: Optional[str] = None    # a folder whose files (and only those) videos may be
    allow_remote_media: bool = False                  # fetch http(s) video URLs (off by default)
    max_video_bytes: int = 256 * MiB                  # a data: URL's decoded video or a fetched one
    max_request_bytes: int = 384 * MiB                # a request body (a base64 video is 4/3 of its bytes)
    remote_timeout_s: float = 30.0                    # a remote fetch, connection to last byte
    max_queued_requests: int = 256                    # requests in flight beyond which new ones get 503
    max_prompt_chars: int = 1_000_000                 # text of one request, before tokenisation

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"ServerSettings.host = {self.host!r}: expected an address such as 127.0.0.1")
        if not is_integer(self.port) or not 0 <= self.port <= 65535:
            raise ConfigError(f"ServerSettings.port = {self.port!r}: expected an integer in [0, 65535]")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("ServerSettings.api_key: expected a non-empty string (or None for no key)")
        for name in ("max_video_bytes", "max_request_bytes", "max_queued_requests", "max_prompt_chars"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ConfigError(f"ServerSettings.{name} = {value!r}: expected an integer >= 1")
        if not is_real(self.remote_timeout_s) or not self.remote_timeout_s > 0:
            raise ConfigError(f"ServerSettings.remote_timeout_s = {self.remote_timeout_s!r}: expected a number > 0")
        if self.allowed_local_media_path is not None:
            folder = os.path.realpath(self.allowed_local_media_path)
            if not os.path.isdir(folder):
                raise ConfigError(f"--allowed-local-media-path {self.allowed_local_media_path!r} is not a folder")
            self.allowed_local_media_path = folder
