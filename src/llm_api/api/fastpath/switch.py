"""Whether an app serves through the fast path: `LLM_API_FAST_PATH` (Settings.fast_path), read
from the app's settings (main.create_app puts them on `app.state.settings` before it includes any
route). An app without llm-api's settings (a test's bare FastAPI app) takes the fast path."""

from __future__ import annotations

from typing import Any


def enabled(app: Any) -> bool:
    settings = getattr(getattr(app, "state", None), "settings", None)
    return bool(getattr(settings, "fast_path", True))
