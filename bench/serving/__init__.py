"""Serving benchmark: drives OpenAI-compatible endpoints with concurrent or Poisson streams and
compares our server with llama.cpp's llama-server and llama-cpp-python's server on one GGUF."""
