"""``parallax serve`` through the official ``openai`` client: completions and chat, streamed and not,
n > 1, stop strings, seeded sampling, logprobs and usage, checked against ``px.inference.LLM.generate``
on the same model."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from parallax.inference import SamplingParams

PROMPTS = ["The history of", "A list is", "Once upon a time, there"]


def _text_and_reasons(stream) -> tuple[dict[int, str], dict[int, str], list]:
    """Concatenated text and finish reason per choice index of a completions stream, and its chunks."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index not in reasons, "a chunk came after the choice's finish reason"
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_greedy_completions_equal_llm_generate(served, reference):
    """One request with three prompts, and each prompt alone, give LLM.generate's text, finish reasons
    and token counts."""
    client = served.client()
    expected = reference.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    batch = client.completions.create(model=served.name, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert batch.object == "text_completion" and batch.id.startswith("cmpl-") and batch.model == served.name
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [e.text for e in expected]
    assert [c.finish_reason for c in batch.choices] == [e.finish_reason for e in expected]
    assert batch.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert batch.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + batch.usage.completion_tokens
    for prompt, e in zip(PROMPTS, expected):
        alone = client.completions.create(model=served.name, prompt=prompt, max_tokens=12, temperature=0)
        assert alone.choices[0].text == e.text
        assert alone.usage.prompt_tokens == len(e.prompt_token_ids)
    ids = served.tokenizer.encode(PROMPTS[0])
    by_ids = client.completions.create(model=served.name, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expected[0].text


def test_streamed_completions_equal_the_whole_answer(served):
    client = served.client()
    whole = client.completions.create(model=served.name, prompt=PROMPTS, max_tokens=20, temperature=0)
    stream = client.completions.create(model=served.name, prompt=PROMPTS, max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    texts, reasons, chunks = _text_and_reasons(stream)
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len(chunks) > len(PROMPTS) + 1  # token by token, not one chunk per choice


def test_echo_prepends_the_prompt(served):
    client = served.client()
    plain = client.completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    echoed = client.completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text
    texts, _, _ = _text_and_reasons(client.completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=5,
                                                              temperature=0, echo=True, stream=True))
    assert texts[0] == echoed.choices[0].text


def test_chat_equals_llm_generate_on_the_chat_template(served, reference):
    client = served.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a list?"}]
    prompt = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = reference.generate(prompt, SamplingParams(max_tokens=10, temperature=0))[0]
    reply = client.chat.completions.create(model=served.name, messages=messages, max_tokens=10, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(expected.prompt_token_ids),
                                                                          len(expected.token_ids))
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
             messages[1]]
    same = client.chat.completions.create(model=served.name, messages=parts, max_completion_tokens=10, temperature=0)
    assert same.choices[0].message.content == expected.text

    chunks = list(client.chat.completions.create(model=served.name, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage == reply.usage


def test_n_samples_and_seeds(served, reference):
    """n = 3 seeded samples: the same seed gives the same texts (streamed or not, and as LLM.generate
    gives them), another seed other texts."""
    client = served.client()
    kwargs = dict(model=served.name, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, n=3)
    first = client.completions.create(**kwargs, seed=7)
    again = client.completions.create(**kwargs, seed=7)
    other = client.completions.create(**kwargs, seed=8)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in again.choices] == texts
    assert [c.text for c in other.choices] != texts
    assert len(set(texts)) > 1  # the samples differ from each other
    expected = reference.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7))[0]
    assert texts == [o.text for o in expected.outputs]
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in expected.outputs)
    streamed, _, _ = _text_and_reasons(client.completions.create(**kwargs, seed=7, stream=True))
    assert [streamed[i] for i in range(3)] == texts

    chat = dict(model=served.name, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2, seed=3)
    a = client.chat.completions.create(**chat)
    b = client.chat.completions.create(**chat)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    chunks = list(client.chat.completions.create(**chat, stream=True))
    contents = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
                for i in range(2)}
    assert contents == {c.index: c.message.content for c in a.choices}
    # the two samples' chunks are interleaved as their tokens come, not one sample after the other
    order = [c.choices[0].index for c in chunks]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)


def test_stop_strings_cut_the_text(served):
    """A stop string taken from the middle of a greedy answer ends it there, streamed or not."""
    client = served.client()
    kwargs = dict(model=served.name, prompt=PROMPTS[2], max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) > 10
    stop = full[6:9]
    cut = full[:full.index(stop)]
    stopped = client.completions.create(**kwargs, stop=[stop, "never-generated"]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (cut, "stop")
    texts, reasons, _ = _text_and_reasons(client.completions.create(**kwargs, stop=stop, stream=True))
    assert (texts[0], reasons[0]) == (cut, "stop")
    unmatched = client.completions.create(**kwargs, stop="never-generated").choices[0]
    assert (unmatched.text, unmatched.finish_reason) == (full, "length")


def test_logprobs(served):
    """Completions: one entry per generated token, top-k dicts with the sampled token; chat: the same
    as token objects with bytes. Greedy picks the most likely token."""
    client = served.client()
    reply = client.completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == reply.usage.completion_tokens == 6
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4 and top[token] == logprob
        assert logprob == max(top.values())
    assert client.completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=2).choices[0].logprobs is None

    chat = client.chat.completions.create(model=served.name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert math.isfinite(entry.logprob)
    chunks = list(client.chat.completions.create(model=served.name, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, logprobs=True, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert all(e.top_logprobs == [] for e in streamed)


def test_max_tokens_is_fitted_to_the_context(served):
    """max_tokens beyond the context ends each prompt's sample with 'length' where the context ends;
    chat without max_tokens runs to the context too."""
    from tests.serve.conftest import CONTEXT

    client = served.client()
    prompts = [PROMPTS[0], PROMPTS[2]]
    reply = client.completions.create(model=served.name, prompt=prompts, max_tokens=100_000, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True})
    for prompt, choice in zip(prompts, reply.choices):
        assert choice.finish_reason == "length"
        assert len(served.tokenizer.encode(prompt)) + len(choice.logprobs.tokens) == CONTEXT + 1
    chat = client.chat.completions.create(model=served.name, messages=[{"role": "user", "content": "hi"}],
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == CONTEXT + 1


def test_models_and_health(served):
    client = served.client()
    models = client.models.list().data
    assert [m.id for m in models] == [served.name] and models[0].owned_by == "parallax"
    assert httpx.get(f"{served.base_url}/health").status_code == 200


def test_metrics_count_what_was_served(served):
    client = served.client()
    client.completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    served.wait_idle()
    text = httpx.get(f"{served.base_url}/metrics").text
    assert "parallax:num_requests_running 0.0" in text
    assert "parallax:kv_cache_blocks_used 0.0" in text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["parallax:generation_tokens_total"] >= 4
    assert samples['parallax:request_success_total{finished_reason="length"}'] >= 1
    assert samples["parallax:time_to_first_token_seconds_count"] >= 1


def test_the_client_sees_openai_errors(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=served.name, prompt="x", max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-9", prompt="x")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_lora_adapters_by_model_name(hf_dir, adapter_dirs, reference, engine_process):
    """Adapters given at start and loaded through /v1/load_lora_adapter are listed as models of the
    base, and concurrent requests for the base and each adapter (one mixed batch) get what
    LLM.generate gives with that adapter: with the engine in the server's process and in its own."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.serve.conftest import serve

    if "alpha" not in reference.engine.lora_names:
        for name, path in adapter_dirs.items():
            reference.add_lora(name, path)
    greedy = SamplingParams(max_tokens=10, temperature=0)
    expected = {lora: [o.text for o in reference.generate(PROMPTS, greedy, lora=lora)]
                for lora in (None, "alpha", "beta")}
    assert expected["alpha"] != expected[None] and expected["beta"] != expected[None]
    with serve(hf_dir, loras={"alpha": adapter_dirs["alpha"]}, engine_process=engine_process) as s:
        client = s.client()
        response = httpx.post(f"{s.base_url}/v1/load_lora_adapter",
                              json={"lora_name": "beta", "lora_path": str(adapter_dirs["beta"])})
        assert response.status_code == 200, response.text
        duplicate = httpx.post(f"{s.base_url}/v1/load_lora_adapter",
                               json={"lora_name": "beta", "lora_path": str(adapter_dirs["beta"])})
        assert duplicate.status_code == 400 and duplicate.json()["error"]["param"] == "lora_name"
        models = {m.id: m for m in client.models.list().data}
        assert list(models) == [s.name, "alpha", "beta"]
        assert models["alpha"].parent == s.name and models["beta"].parent == s.name

        jobs = [(lora, i) for lora in (None, "alpha", "beta") for i in range(len(PROMPTS))]

        def ask(job):
            lora, i = job
            reply = client.completions.create(model=lora or s.name, prompt=PROMPTS[i], max_tokens=10, temperature=0)
            assert reply.model == (lora or s.name)
            return reply.choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(ask, jobs))
        assert texts == [expected[lora][i] for lora, i in jobs]
        chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0)
        assert chat.model == "beta"


def test_logprobs_json_has_no_infinities():
    """-inf (a token the model rules out) and NaN become -9999 (JSON has no infinities), as in vLLM;
    the sampled token joins the completions top dict."""
    import json

    from parallax.inference.sequence import TokenLogprob
    from parallax.serve.protocol import MIN_LOGPROB, chat_logprobs, completion_logprobs

    entries = [TokenLogprob(5, float("-inf"), [(3, -0.1), (4, float("nan"))]), TokenLogprob(3, -0.5, [(3, -0.5)])]
    text = {3: "a", 4: "b", 5: "c"}.__getitem__
    legacy = completion_logprobs(entries, text, offset=2)
    assert legacy == {"tokens": ["c", "a"], "token_logprobs": [MIN_LOGPROB, -0.5],
                      "top_logprobs": [{"a": -0.1, "b": MIN_LOGPROB, "c": MIN_LOGPROB}, {"a": -0.5}],
                      "text_offset": [2, 3]}
    chat = chat_logprobs(entries, text)["content"]
    assert [e["logprob"] for e in chat] == [MIN_LOGPROB, -0.5]
    assert [t["logprob"] for t in chat[0]["top_logprobs"]] == [-0.1, MIN_LOGPROB]
    json.dumps([legacy, chat], allow_nan=False)
