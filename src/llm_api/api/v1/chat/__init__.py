"""/v1/chat/completions: protocol (wire request → engine requests) and serving (frames → OpenAI
chunks or whole responses). The route is api/v1/endpoints/chat.py."""
