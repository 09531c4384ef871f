"""The Responses API family: POST /v1/responses, served by the chat pipeline."""
