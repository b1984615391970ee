"""POST /v1/responses (OpenAI's Responses API, stateless) through the official openai client on a real uvicorn
server (test_api.py's tiny Llama, whose chat template shows tools). The oracle is /v1/chat/completions: a Responses
request is a chat request in other clothes, so its text, tool calls and usage must be chat's for the equivalent
messages; streamed events must add up to the whole response.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai.types.responses import ResponseUsage

from tests.test_api import MODEL_NAME, PARAMS, TOOLS, build_api_model, post, run_server
from tests.test_server import assert_openai_error

FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses shape: no nested "function"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_api_model(tmp_path_factory.mktemp("responses-model"), tokenizer_dir)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("responses-log") / "server.log"


@pytest.fixture(scope="module")
def url(model_dir, log_path) -> Iterator[str]:
    with run_server(model_dir, log_path) as base:
        yield base


def chat_text(client, messages: list[dict], **kwargs) -> tuple[str, dict]:
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)
    return r.choices[0].message.content, r.usage.model_dump()


def against_chat(client, messages: list[dict], chat_kwargs: dict, **kwargs) -> tuple[object, str, dict]:
    """A response and chat's answer (text, usage) to the equivalent messages; chat asked once before, so that
    both find the prompt in the prefix cache alike."""
    chat_text(client, messages, **chat_kwargs)
    r = client.responses.create(model=MODEL_NAME, **kwargs)
    return (r, *chat_text(client, messages, **chat_kwargs))


def same_usage(responses_usage, chat_usage: dict) -> bool:
    u = responses_usage
    ResponseUsage.model_validate(u.model_dump())  # every field the client's type requires
    return (u.input_tokens, u.output_tokens, u.total_tokens, u.input_tokens_details.cached_tokens) == (
        chat_usage["prompt_tokens"],
        chat_usage["completion_tokens"],
        chat_usage["total_tokens"],
        chat_usage["prompt_tokens_details"]["cached_tokens"],
    )


def streamed(client, **kwargs) -> tuple[list, object]:
    """Every event of a streamed response, and the Response its last event carries."""
    events = list(client.responses.create(model=MODEL_NAME, stream=True, **kwargs))
    return events, events[-1].response


def test_string_and_item_inputs_answer_as_chat_does(client):
    messages = [{"role": "user", "content": "Speak of love."}]
    chat = dict(max_tokens=12, temperature=0)
    r, text, usage = against_chat(client, messages, chat, input="Speak of love.", max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.created_at > 0
    assert [item.type for item in r.output] == ["message"] and r.output_text == text
    assert r.output[0].content[0].annotations == [] and same_usage(r.usage, usage)
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                        {"type": "input_text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]},
        {"role": "user", "content": "Speak."},
    ]  # fmt: skip
    messages = [
        {"role": "system", "content": "You are Romeo."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Speak."},
    ]
    r, text, usage = against_chat(client, messages, dict(max_tokens=10, temperature=0), input=items,
                                  instructions="You are Romeo.", max_output_tokens=10, temperature=0,
                                  metadata={"k": "v"}, user="u-1", store=True)  # fmt: skip
    assert r.output_text == text and same_usage(r.usage, usage)
    assert (r.instructions, r.metadata, r.user, r.max_output_tokens, r.temperature) == (
        "You are Romeo.", {"k": "v"}, "u-1", 10, 0.0,
    )  # fmt: skip


def test_a_stream_adds_up_to_the_whole_response(client):
    kwargs = dict(input="Speak.", max_output_tokens=16, temperature=1.0, extra_body={"seed": 7})
    whole = client.responses.create(model=MODEL_NAME, **kwargs)
    events, final = streamed(client, **kwargs)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]  # fmt: skip
    assert set(types[4:-4]) == {"response.output_text.delta"}
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text == final.output_text == whole.output_text != ""
    assert events[0].response.status == "in_progress" and final.status == "completed"
    item_done = next(e for e in events if e.type == "response.output_item.done")
    assert item_done.item.status == final.output[0].status == whole.output[0].status == "completed"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens,
        whole.usage.output_tokens,
    )
    assert final.output[0].id == events[2].item.id
    # logprobs: one per token, on the deltas as on the whole text, the likeliest first
    lp = dict(kwargs, include=["message.output_text.logprobs"], top_logprobs=2)
    whole = client.responses.create(model=MODEL_NAME, **lp)
    events, final = streamed(client, **lp)
    logprobs = whole.output[0].content[0].logprobs
    assert len(logprobs) == whole.usage.output_tokens and all(len(x.top_logprobs) == 2 for x in logprobs)
    assert [x.logprob for e in events if e.type == "response.output_text.delta" for x in e.logprobs] == [
        x.logprob for x in logprobs
    ]
    assert final.output[0].content[0].logprobs == logprobs


def test_max_output_tokens_leaves_the_response_incomplete(client):
    kwargs = dict(input="Speak.", max_output_tokens=3, extra_body={"ignore_eos": True})
    r = client.responses.create(model=MODEL_NAME, **kwargs)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    events, final = streamed(client, **kwargs)
    assert events[-1].type == "response.incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.status == "incomplete"
    (item_done,) = [e for e in events if e.type == "response.output_item.done"]
    assert item_done.item.status == final.output[0].status == "incomplete"


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_cut_short_is_incomplete(client, stream):
    """A named function's arguments are the output as it stands: cut by max_output_tokens, the call carries chat's
    cut arguments and says it is incomplete (as OpenAI marks a cut item), in the whole response as in the streamed
    item's done event."""
    named = {"type": "function", "function": {"name": "get_time"}}
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Time?"}],
                                          tools=TOOLS, tool_choice=named, max_tokens=3, temperature=0)  # fmt: skip
    (want,) = chat.choices[0].message.tool_calls
    assert chat.choices[0].finish_reason == "length"
    kwargs = dict(input="Time?", tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "get_time"},
                  max_output_tokens=3, temperature=0)  # fmt: skip
    if stream:
        events, r = streamed(client, **kwargs)
        (item_done,) = [e for e in events if e.type == "response.output_item.done"]
        assert item_done.item.model_dump() == r.output[0].model_dump()
    else:
        r = client.responses.create(model=MODEL_NAME, **kwargs)
    (call,) = r.output
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert (call.type, call.name, call.arguments, call.status) == ("function_call", "get_time",
                                                                   want.function.arguments, "incomplete")  # fmt: skip


def test_a_json_schema_format_is_followed(client):
    import jsonschema

    text = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2):
        kwargs = dict(input="Who?", text=text, temperature=1.0, max_output_tokens=60, extra_body={"seed": seed})
        r = client.responses.create(model=MODEL_NAME, **kwargs)
        jsonschema.validate(json.loads(r.output_text), SCHEMA)
        assert r.text.format.type == "json_schema" and r.text.format.name == "person"
        assert streamed(client, **kwargs)[1].output_text == r.output_text


def test_a_function_call_round_trip(client):
    import jsonschema

    kwargs = dict(input="Weather in Verona?", tools=FLAT_TOOLS, tool_choice="required", temperature=1.0,
                  max_output_tokens=300, parallel_tool_calls=False, extra_body={"seed": 2})  # fmt: skip
    r = client.responses.create(model=MODEL_NAME, **kwargs)
    (call,) = r.output
    assert call.type == "function_call" and call.call_id and call.id.startswith("fc_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])
    events, final = streamed(client, **kwargs)
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert [(c.name, c.arguments) for c in final.output] == [(call.name, call.arguments)] == [(done.name, arguments)]
    assert final.output[0].status == "completed"
    assert final.tools[0].name == "get_weather" and final.tool_choice == "required"
    # the call and its output fed back: the prompt chat renders from the equivalent messages
    follow = ["Weather in Verona?", call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}]  # fmt: skip
    follow[0] = {"role": "user", "content": follow[0]}
    messages = [
        {"role": "user", "content": "Weather in Verona?"},
        {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                                              "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky": "clear"}'},
    ]  # fmt: skip
    again, text, usage = against_chat(client, messages, dict(tools=TOOLS, max_tokens=8, temperature=0), input=follow,
                                      tools=FLAT_TOOLS, max_output_tokens=8, temperature=0)  # fmt: skip
    assert again.output_text == text and same_usage(again.usage, usage)
    # a named function: its arguments, whole
    named = client.responses.create(
        model=MODEL_NAME,
        input="Time?",
        tools=FLAT_TOOLS,
        temperature=1.0,
        tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=100,
    )
    (call,) = named.output
    assert call.name == "get_time" and named.status == call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), PARAMS["get_time"])


def test_a_cut_required_array_answers_its_calls_then_the_rest():
    """tool_choice "required" cut by max_output_tokens after a complete call: the call, then the unfinished rest as
    an incomplete message, the order a stream sends them in (each call once the array holds it whole, the rest at
    the end); auto's text before its calls stays first."""
    from types import SimpleNamespace

    from miniserve.server.chat import ChatRun
    from miniserve.server.protocol import ChatCompletionRequest
    from miniserve.server.responses_api import output_items
    from miniserve.server.tool_calls import ToolSetup

    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])
    cut = SimpleNamespace(text='[{"name": "f", "parameters": {"a": 1}}, {"na', finish_reason="length", token_ids=[])
    required = ChatRun([], ToolSetup("required", None, None, True, TOOLS), None, None)
    items = output_items(None, chat, required, cut)
    assert [(i["type"], i["status"]) for i in items] == [("function_call", "completed"), ("message", "incomplete")]
    assert items[0]["arguments"] == '{"a": 1}' and items[1]["content"][0]["text"] == '{"na'
    hermes = SimpleNamespace(text='Sure.<tool_call>{"name": "f", "arguments": {}}</tool_call>', finish_reason="stop",
                             token_ids=[])  # fmt: skip
    auto = ChatRun([], ToolSetup("auto", "hermes", None, True, TOOLS), None, None)
    assert [i["type"] for i in output_items(None, chat, auto, hermes)] == ["message", "function_call"]


def test_reasoning_items_go_with_the_assistant_message_after_them_as_in_chat():
    """A reasoning item (as this server returns it) is the `reasoning` of the assistant message that the next item
    makes or joins: the chat template gets what chat's messages with that reasoning give it; one that no assistant
    item follows is dropped. Content parts stay parts, and a tool output's name is the tool message's, as in
    chat."""
    from miniserve.server.protocol import ChatCompletionRequest
    from miniserve.server.responses_api import chat_request
    from miniserve.server.responses_protocol import ResponsesRequest

    def thought(text: str) -> dict:
        return {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}

    call = {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"}
    parts = [{"type": "input_text", "text": "Time"}, {"type": "input_text", "text": "?"}]
    items = [
        {"role": "user", "content": parts}, thought("call it"), call,
        {"type": "function_call_output", "call_id": "c1", "output": "noon", "name": "get_time"}, thought("answer"),
        {"role": "assistant", "content": "Noon."}, thought("never said"), {"role": "user", "content": "Thanks."},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "a summary"}]},  # no reasoning text
        {"role": "assistant", "content": "Bye."},
    ]  # fmt: skip
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Time"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "reasoning": "call it", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "noon", "name": "get_time"},
        {"role": "assistant", "content": "Noon.", "reasoning": "answer"},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "Bye."},
    ]  # fmt: skip
    got = chat_request(ResponsesRequest.model_validate({"model": MODEL_NAME, "input": items}))
    want = ChatCompletionRequest.model_validate({"model": MODEL_NAME, "messages": messages})
    assert [m.for_template() for m in got.messages] == [m.for_template() for m in want.messages]
    assert got.messages[1].for_template()["reasoning"] == "call it"


REFUSED = {
    "previous_response_id": "resp_123", "conversation": "conv_1", "background": True, "prompt": {"id": "pmpt_1"},
    "max_tool_calls": 3, "truncation": "auto", "include": ["reasoning.encrypted_content"],
    "context_management": [{"type": "compaction"}], "moderation": {"model": "omni-moderation-latest"},
    "image": {"context_compression": "auto"}, "access_programs": {"cyber": "standard"},
    "prompt_cache_options": {"ttl": "12h"}, "background_options": {"completion_window": "2h"},
    "service_tier": "flex", "priority": 1, "vllm_xargs": {"x": 1}, "kv_transfer_params": {"x": 1},
    "mm_processor_kwargs": {"x": 1}, "enable_response_messages": True, "previous_input_messages": [{}],
    "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search_preview"},
    "text": {"format": {"type": "text"}, "verbosity": "low"}, "reasoning": {"summary": "detailed"},
    "stream_options": {"include_obfuscation": True},
    "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}],
}  # fmt: skip
HONOURED = {
    "store": True, "metadata": {"k": "v"}, "user": "u", "safety_identifier": "s", "prompt_cache_key": "k",
    "prompt_cache_retention": "24h", "service_tier": "auto", "truncation": "disabled", "top_p": 0.9,
    "parallel_tool_calls": True, "reasoning": {"effort": "none", "summary": "auto"}, "background": False,
    "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5,
    "stop": ["\n"], "ignore_eos": True, "logit_bias": {"5": 2.0}, "skip_special_tokens": False,
    "include_stop_str_in_output": True, "request_id": "my-response-1", "cache_salt": "salt",
    "structured_outputs": {"regex": "[a-z]+"}, "chat_template_kwargs": {"mood": "calm"}, "session_id": "s1",
    "text": {"format": {"type": "json_object"}}, "include": ["message.output_text.logprobs"], "top_logprobs": 2,
}  # fmt: skip


def test_every_refused_field_is_named_and_unknown_fields_are_ignored_with_a_warning(url, log_path):
    base = {"model": MODEL_NAME, "input": "Speak.", "max_output_tokens": 3}
    for name, value in REFUSED.items():
        body = {**base, name: value, **({"stream": True} if name == "stream_options" else {})}
        r = post(url, "/v1/responses", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
    for name, value in HONOURED.items():
        r = post(url, "/v1/responses", {**base, name: value})
        assert r.status_code == 200, (name, r.text)
    r = post(url, "/v1/responses", {**base, "request_id": "mine", "top_logprobs": 0})  # 0: no logprobs asked
    assert r.json()["id"] == "mine" and "logprobs" not in r.json()["output"][0]["content"][0], r.text
    r = post(url, "/v1/responses", {**base, "made_up_field": 1, "input": [{"role": "user", "content": "x", "odd": 1}]})
    assert r.status_code == 200, r.text
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if "fields ignored" in line]
    assert any("/v1/responses" in line and "made_up_field" in line and "input[0].odd" in line for line in lines)
    # what a stateless server does not have
    assert httpx.get(f"{url}/v1/responses/resp_123", timeout=10).status_code in (404, 405)
    # a chat error names the Responses field
    r = post(url, "/v1/responses", {**base, "max_output_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens", r.text


CALL = {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"}
OUTPUT = {"type": "function_call_output", "call_id": "c1", "output": "noon"}
TOOL = FLAT_TOOLS[0]
# fields of OpenAI's tools and items that tool search and calls made by code give a meaning: (field, value) where
# they are refused, and a value taken as it means here
ITEM_FIELDS = [
    ("tools", {**TOOL, "defer_loading": True}, {**TOOL, "defer_loading": False}, "defer_loading"),
    ("tools", {**TOOL, "allowed_callers": ["programmatic"]}, {**TOOL, "allowed_callers": ["direct"]},
     "allowed_callers"),
    ("tools", {**TOOL, "output_schema": {"type": "string"}}, {**TOOL, "output_schema": None}, "output_schema"),
    ("tools", {**TOOL, "async": True}, {**TOOL, "async": False}, "async"),
    ("input", {**CALL, "caller": {"type": "program", "caller_id": "p"}}, {**CALL, "caller": {"type": "direct"}},
     "caller"),
    ("input", {**CALL, "namespace": "ns"}, {**CALL, "namespace": None}, "namespace"),
    ("input", {**CALL, "async": True}, {**CALL, "async": False}, "async"),
    ("input", {**OUTPUT, "caller": {"type": "program", "caller_id": "p"}}, {**OUTPUT, "caller": {"type": "direct"}},
     "caller"),
    ("input", {**OUTPUT, "namespace": "ns"}, {**OUTPUT, "name": "get_time"}, "namespace"),
    ("input", {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"},
     {"type": "reasoning", "summary": [], "encrypted_content": None}, "encrypted_content"),
    ("input", {"role": "user", "content": [{"type": "input_text", "text": "x", "prompt_cache_breakpoint": {
        "mode": "explicit"}}]}, None, None),
]  # fmt: skip


@pytest.mark.parametrize(("where", "refused", "taken", "field"), ITEM_FIELDS)
def test_fields_of_tools_and_input_items_are_honoured_or_refused_by_name(url, log_path, where, refused, taken, field):
    """No field of OpenAI's tool and item schemas is dropped with a warning: each is taken or refused naming it."""
    base = {"model": MODEL_NAME, "input": [{"role": "user", "content": "Time?"}], "max_output_tokens": 2}

    def body(entry: dict) -> dict:
        if where == "tools":
            return {**base, "tools": [entry], "tool_choice": "none"}
        return {**base, "input": [*base["input"], entry] if entry.get("type") != "function_call_output" else
                [*base["input"], CALL, entry]}  # fmt: skip

    if field is not None:
        err = assert_openai_error(post(url, "/v1/responses", body(refused)), 400, where)
        assert f" {field}: " in err["message"], err
    before = log_path.read_text(errors="replace").count("fields ignored")
    r = post(url, "/v1/responses", body(taken or refused))
    assert r.status_code == 200, r.text
    assert log_path.read_text(errors="replace").count("fields ignored") == before


def test_tool_choice_auto_is_the_default_with_or_without_tools(url):
    """OpenAI's default tool_choice, sent explicitly, asks for nothing more: without tools (or with none) it
    answers as when left out, and a response repeats "auto" either way."""
    base = {"model": MODEL_NAME, "input": "Speak.", "max_output_tokens": 3, "temperature": 0}
    plain = post(url, "/v1/responses", base).json()
    for extra in ({"tool_choice": "auto"}, {"tool_choice": "auto", "tools": []}):
        r = post(url, "/v1/responses", {**base, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["output"][0]["content"] == plain["output"][0]["content"] and r.json()["tool_choice"] == "auto"
    assert plain["tool_choice"] == "auto"


def test_a_json_schema_format_needs_its_name(url):
    """As OpenAI's: text.format of type json_schema without `name` is a 400 (a response repeating the format
    without one would fail the client's own type)."""
    fmt = {"type": "json_schema", "schema": SCHEMA}
    body = {"model": MODEL_NAME, "input": "Speak.", "max_output_tokens": 3, "text": {"format": fmt}}
    err = assert_openai_error(post(url, "/v1/responses", body), 400, "text")
    assert err["message"] == "text.format: format of type json_schema needs a name and a schema", err
    r = post(url, "/v1/responses", {**body, "text": {"format": {**fmt, "name": "person"}}})
    assert r.status_code == 200 and r.json()["text"]["format"]["name"] == "person", r.text


def test_events_are_named_server_sent_events_without_done(url):
    """As OpenAI streams them: each `event:` line names its data's type; the stream ends with its last event."""
    body = {"model": MODEL_NAME, "input": "Speak.", "max_output_tokens": 4, "stream": True}
    blocks = post(url, "/v1/responses", body).text.strip().split("\n\n")
    for block in blocks:
        event, data = block.split("\n")
        assert event == "event: " + json.loads(data.removeprefix("data: "))["type"], block
    assert json.loads(blocks[-1].split("data: ")[1])["type"] in ("response.completed", "response.incomplete")


def test_fields_sent_as_null_read_as_not_given(url):
    from miniserve.server.responses_protocol import ResponsesRequest

    plain = {"model": MODEL_NAME, "input": "Speak.", "max_output_tokens": 4, "temperature": 0}
    nulls = {name: None for name in ResponsesRequest.model_fields if name not in plain}
    r = post(url, "/v1/responses", {**plain, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"] == post(url, "/v1/responses", plain).json()["output"][0]["content"]


def test_a_bad_input_item_is_named_by_its_field(url):
    """input is a string or a list of items: an item's error names the item and its field, not the string branch
    the list was never meant for ("input.str: Input should be a valid string"), nor pydantic's tag of the item's
    kind ("input.1.function_call.arguments")."""
    items = [{"role": "user", "content": "x"}, {"type": "function_call", "call_id": "c1", "name": "get_time"}]
    err = assert_openai_error(post(url, "/v1/responses", {"model": MODEL_NAME, "input": items}), 400, "input")
    assert err["message"] == "input.1.arguments: Field required", err
    items = [{"role": "user", "content": "x", "status": 5}]
    err = assert_openai_error(post(url, "/v1/responses", {"model": MODEL_NAME, "input": items}), 400, "input")
    assert err["message"].startswith("input.0.status: "), err
    # a call's arguments that are no JSON: the item named, not the chat message it would become
    call = {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{oops"}
    body = {"model": MODEL_NAME, "instructions": "Be brief.", "input": [call]}
    err = assert_openai_error(post(url, "/v1/responses", body), 400, "input")
    assert err["message"] == "input.0.arguments: must be JSON text, got '{oops'", err


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_beside_tools_are_refused_by_name(url, stream):
    body = {"model": MODEL_NAME, "input": "x", "tools": FLAT_TOOLS, "include": ["message.output_text.logprobs"]}
    r = post(url, "/v1/responses", {**body, "stream": stream})
    assert r.status_code == 400 and r.json()["error"]["param"] == "include", r.text


def test_a_chat_error_names_the_responses_fields(url):
    """An error of the chat path is chat's own error, with the fields named as the client sent them: `text.format`
    for response_format, `input` for messages, `max_output_tokens` for max_completion_tokens (in `param` the
    top-level field: `text`)."""
    names = {"response_format": "text.format", "messages": "input", "max_completion_tokens": "max_output_tokens"}

    def both(chat: dict, responses: dict, param: str) -> str:
        """Chat's error message and the one /v1/responses gives for the same request, which must be chat's with
        the Responses names."""
        base = {"model": MODEL_NAME, "messages": [{"role": "user", "content": responses.get("input", "Time?")}]}
        want = assert_openai_error(post(url, "/v1/chat/completions", {**base, **chat}), 400)["message"]
        body = {"model": MODEL_NAME, "input": "Time?", **responses}
        got = assert_openai_error(post(url, "/v1/responses", body), 400, param)["message"]
        for old, new in names.items():
            want = want.replace(old, new)
        assert got == want and not any(old in got for old in names), got
        return got

    bad = {"type": "object", "properties": {"x": {"type": "bogus"}}}
    text = {"format": {"type": "json_schema", "name": "x", "schema": bad}}
    msg = both({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}},
               {"text": text}, "text")  # fmt: skip
    assert msg.startswith("text.format: ") and "invalid JSON schema" in msg
    regex = {"structured_outputs": {"regex": "[a-z]+"}}
    msg = both({**regex, "response_format": {"type": "json_object"}},
               {**regex, "text": {"format": {"type": "json_object"}}}, "text")  # fmt: skip
    assert msg.endswith("got several (structured_outputs, text.format)")
    for fmt in (
        {"type": "text", "schema": {}},
        {"type": "json_object", "strict": True},
    ):  # they would constrain nothing
        body = {"model": MODEL_NAME, "input": "x", "text": {"format": fmt}}
        assert (
            "read only with type json_schema"
            in assert_openai_error(post(url, "/v1/responses", body), 400, "text")["message"]
        )
    msg = both({}, {"input": "a" * 30000}, "input")
    assert msg.startswith("the input has 30000 characters")
    msg = both({"max_completion_tokens": 10**6}, {"max_output_tokens": 10**6}, "max_output_tokens")
    assert "in the input, 1000000 in the completion" in msg
    # a tool's field as the flat Responses tool names it (chat's is nested under "function")
    body = {"model": MODEL_NAME, "input": "hi", "tools": [{"type": "function", "name": ""}], "tool_choice": "required"}
    err = assert_openai_error(post(url, "/v1/responses", body), 400, "tools")
    assert err["message"].startswith("tools.0.name: "), err


def test_reasoning_effort_is_refused_as_chat_refuses_it_but_none_switches_thinking_off(url):
    """Chat refuses reasoning_effort (no template is known to read it), and so /v1/responses refuses
    reasoning.effort, by name; "none" is what chat honours as chat_template_kwargs enable_thinking false (the
    template's variable: tests/test_server_reasoning.py sees a thinking model answer so), and is passed as such."""
    from miniserve.server.protocol import ChatCompletionRequest
    from miniserve.server.responses_api import chat_request
    from miniserve.server.responses_protocol import ResponsesRequest

    base = {"model": MODEL_NAME, "input": "Time?", "max_output_tokens": 3}
    messages = [{"role": "user", "content": "Time?"}]
    chat_body = {"model": MODEL_NAME, "messages": messages, "reasoning_effort": "high"}
    assert_openai_error(post(url, "/v1/chat/completions", chat_body), 400, "reasoning_effort")
    for effort in ("minimal", "low", "medium", "high"):
        err = assert_openai_error(post(url, "/v1/responses", {**base, "reasoning": {"effort": effort}}), 400)
        assert err["param"] == "reasoning" and err["message"].startswith("reasoning: effort: "), err
    assert post(url, "/v1/responses", {**base, "reasoning": {"effort": "none"}}).status_code == 200

    def chat_of(body: dict) -> ChatCompletionRequest:
        return chat_request(ResponsesRequest.model_validate({**base, **body}))

    def chat(**fields) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"messages": messages, "max_completion_tokens": 3, **fields})

    assert chat_of({"reasoning": {"effort": "none"}}) == chat(chat_template_kwargs={"enable_thinking": False})
    # the request's own variable stands
    kwargs = {"enable_thinking": True, "mood": "calm"}
    own = chat_of({"reasoning": {"effort": "none"}, "chat_template_kwargs": kwargs})
    assert own == chat(chat_template_kwargs=kwargs)
    assert chat_of({"reasoning": {}}) == chat()
