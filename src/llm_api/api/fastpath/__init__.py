"""The fast path: code that does what FastAPI, Starlette and uvicorn do, in fewer instructions,
for the completion routes. README.md says what each part buys and how to turn it off
(`LLM_API_FAST_PATH=false`: every part falls back to the stock code, same answers)."""

from llm_api.api.fastpath.response import FinalFrame, StreamResponse
from llm_api.api.fastpath.route import LeanRoute
from llm_api.api.fastpath.switch import enabled

__all__ = ["FinalFrame", "LeanRoute", "StreamResponse", "enabled"]
