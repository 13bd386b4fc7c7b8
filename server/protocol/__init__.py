"""The OpenAI wire format: the one source of truth for requests and responses."""

from server.protocol.requests import ChatCompletionRequest, ChatMessage, CompletionRequest, StreamOptions
from server.protocol.responses import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs,
    Completion, CompletionChoice, CompletionLogprobs, Delta, ErrorResponse, ModelCard, ModelList,
    TokenLogprobOut, TopLogprob, Usage,
)

__all__ = [
    "AssistantMessage", "ChatChoice", "ChatChunkChoice", "ChatCompletion", "ChatCompletionChunk",
    "ChatCompletionRequest", "ChatLogprobs", "ChatMessage", "Completion", "CompletionChoice",
    "CompletionLogprobs", "CompletionRequest", "Delta", "ErrorResponse", "ModelCard", "ModelList", "StreamOptions",
    "TokenLogprobOut", "TopLogprob", "Usage",
]
