"""vLLM's /tokenize and /detokenize: the server's tokenizer, and its chat template for messages."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from miniserve.server import responses as fmt
from miniserve.server.protocol import (
    APIError,
    DetokenizeRequest,
    TokenizeRequest,
)
from miniserve.server.state import state_of


async def tokenize(request: Request) -> JSONResponse:
    """vLLM's /tokenize: a prompt, or messages rendered as /v1/chat/completions renders them."""
    state = state_of(request)
    req: TokenizeRequest = await state.parse(request, TokenizeRequest)
    if req.messages is not None:
        ids = await state.encode_chat(
            [m.for_template() for m in req.messages],
            req.add_generation_prompt,
            for_generation=False,
            add_special_tokens=req.add_special_tokens if "add_special_tokens" in req.model_fields_set else None,
            tools=None if req.tools is None else [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools],
            documents=req.documents,
            chat_template=req.chat_template,
            continue_final_message=req.continue_final_message,
            template_kwargs=req.chat_template_kwargs,
        )
    else:
        state.check_prompt_chars(len(req.prompt), "prompt", for_generation=False)
        ids = await state.run_cpu(state.tokenizer.encode, req.prompt, req.add_special_tokens)
    body: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}
    if req.return_token_strs:  # the vocabulary's own strings (e.g. "▁world", "Ġworld"), as vLLM returns them
        body["token_strs"] = [state.tokenizer.id_to_token(t) for t in ids]
    return fmt.JSONBytesResponse(body)


async def detokenize(request: Request) -> JSONResponse:
    """vLLM's /detokenize: the ids' text, special tokens included (the inverse of /tokenize with its specials)."""
    state = state_of(request)
    req: DetokenizeRequest = await state.parse(request, DetokenizeRequest)
    vocab = state.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
    return JSONResponse({"prompt": await state.run_cpu(state.tokenizer.decode, req.tokens, False)})
