// The Vercel AI SDK's tool loop against llm-api: generateText and streamText with a tool, through
// @ai-sdk/openai-compatible and through @ai-sdk/openai's chat model. Each run lets the model call
// the tool, runs it, sends the result back and takes the final text. Prints one JSON object (what
// ran, what came back) for tests/clients/test_tool_agents.py to check; exits non-zero on error.
//   LLM_API_BASE_URL=http://127.0.0.1:8000/v1 LLM_API_KEY=... LLM_API_MODEL=m node tool_clients.mjs
// With the argument `local` (a small local model, which rarely chooses a tool by itself): one
// generateText whose first step forces the call (toolChoice "required") and whose next step
// forbids another ("none"), so the loop is call, result, answer.
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const baseURL = process.env.LLM_API_BASE_URL;
const apiKey = process.env.LLM_API_KEY;
const modelId = process.env.LLM_API_MODEL;

function weatherTool(calls) {
  return tool({
    description: "Current weather in a city",
    inputSchema: z.object({ city: z.string().max(40) }),
    execute: async ({ city }) => {
      calls.push(city);
      return `21 C and sunny in ${city}`;
    },
  });
}

function summary(result, calls, text) {
  return {
    text,
    calls,
    steps: result.steps.length,
    finishReasons: result.steps.map((s) => s.finishReason),
    toolCalls: result.steps.flatMap((s) =>
      s.toolCalls.map((c) => ({ id: c.toolCallId, name: c.toolName, input: c.input })),
    ),
  };
}

const compatible = createOpenAICompatible({ name: "llm-api", baseURL, apiKey, includeUsage: true });
const openai = createOpenAI({ baseURL, apiKey });
const out = {};

if (process.argv[2] === "local") {
  const calls = [];
  const result = await generateText({
    model: compatible(modelId),
    tools: { get_weather: weatherTool(calls) },
    stopWhen: stepCountIs(3),
    prepareStep: ({ stepNumber }) => ({ toolChoice: stepNumber === 0 ? "required" : "none" }),
    temperature: 0,
    maxOutputTokens: 120,
    prompt: "What is the weather in Paris?",
  });
  out.local = summary(result, calls, result.text);
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(0);
}

{
  const calls = [];
  const result = await generateText({
    model: compatible(modelId),
    tools: { get_weather: weatherTool(calls) },
    stopWhen: stepCountIs(4),
    prompt: "What is the weather in Paris and in Tokyo? (generateText)",
  });
  out.generateText = summary(result, calls, result.text);
}

{
  const calls = [];
  const result = streamText({
    model: compatible(modelId),
    tools: { get_weather: weatherTool(calls) },
    stopWhen: stepCountIs(4),
    prompt: "What is the weather in Paris and in Tokyo? (streamText)",
  });
  let streamed = "";
  for await (const delta of result.textStream) streamed += delta;
  out.streamText = summary({ steps: await result.steps }, calls, await result.text);
  out.streamText.streamed = streamed;
}

{
  const calls = [];
  const result = await generateText({
    model: openai.chat(modelId),
    tools: { get_weather: weatherTool(calls) },
    stopWhen: stepCountIs(4),
    prompt: "What is the weather in Paris and in Tokyo? (@ai-sdk/openai)",
  });
  out.openaiChat = summary(result, calls, result.text);
}

process.stdout.write(JSON.stringify(out) + "\n");
