"""/v1/completions: protocol (wire request → engine requests) and serving (frames → OpenAI
chunks or whole responses). The route is router.py (thin: validate, run, encode)."""
