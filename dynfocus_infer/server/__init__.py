"""OpenAI-compatible HTTP server over one AsyncLLM (DESIGN section 11): `dynfocus-infer serve`.

    settings.py  ServerSettings: where it listens, what it may read, its limits
    protocol.py  request bodies (strict: unknown fields are a 400) -> Request + SamplingParams
    media.py     video_url -> a local file (allowed folder, data: URL, optional remote fetch), size-limited
    responses.py RequestOutput -> OpenAI response objects and stream chunks
    metrics.py   Prometheus counters and histograms (/metrics)
    app.py       the FastAPI application: routes, errors, authentication, streaming
"""
from .settings import ServerSettings

__all__ = ["ServerSettings", "build_app", "serve"]


def build_app(engine, settings: ServerSettings):
    from .app import build_app as _build
    return _build(engine, settings)


def serve(engine, settings: ServerSettings) -> None:
    from .app import run
    run(engine, settings)
