// Server-sent events over fetch + ReadableStream (EventSource cannot send an Authorization
// header or a POST body). Hand-written because it is ~40 lines and the browser has no parser
// for a fetched body; it follows the WHATWG event-stream rules for the parts OpenAI uses:
// `data:` lines (joined by "\n"), comments (`:`) ignored, an event ends at a blank line.

/** Yield each `data:` payload parsed as JSON until `[DONE]`. An in-band error frame throws. */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) !== -1) {
        const line = buffer.slice(0, newline);
        const width = buffer.startsWith("\r\n", newline) ? 2 : 1;
        buffer = buffer.slice(newline + width);
        if (line === "") {
          if (data.length === 0) continue;
          const payload = data.join("\n");
          data = [];
          if (payload === "[DONE]") return;
          const event = JSON.parse(payload);
          if (event.error) {
            const err = new Error(event.error.message || "stream error");
            err.code = event.error.code;
            throw err;
          }
          yield event;
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
        // comments (":") and other fields (event:, id:, retry:) are not used by the API
      }
    }
  } finally {
    // Stopping early (or an abort) must close the body so the server sees the disconnect.
    reader.cancel().catch(() => {});
  }
}
