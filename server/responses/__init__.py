"""OpenAI's Responses API over the chat service: input items, translation, streaming events and the store."""
