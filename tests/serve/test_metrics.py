"""``ServeMetrics``: the Prometheus text, parsed back, after a known workload through ``AsyncEngine``
(token and request counts and histogram counts exact), and the windowed tokens/s on a fake clock."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from parallax.models import GPT
from tests.helpers import context_sensitive_gpt
from prometheus_client.parser import text_string_to_metric_families

from parallax.inference import LLM, EngineConfig, LLMEngine, SamplingParams
from parallax.serve.async_engine import AsyncEngine
from parallax.serve.metrics import SNAPSHOT_GAUGES, ServeMetrics

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

CONTEXT = 64
TIMEOUT = 20.0


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for every sample of the exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def value(parsed: dict, name: str, **labels) -> float:
    return parsed[("parallax:" + name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def model() -> GPT:
    return context_sensitive_gpt(block_size=CONTEXT, vocab_size=96, n_layer=2, n_head=2, n_embd=32)


def test_workload_counts_are_exact(model):
    prompt_c = [10, 20, 30]
    greedy_c = LLM(model, block_size=8, num_blocks=32).generate([prompt_c], SamplingParams(max_tokens=6,
                                                                                        temperature=0))[0].token_ids
    stop_token = greedy_c[2]
    c_tokens = greedy_c.index(stop_token) + 1  # a stop token is kept in the output
    assert c_tokens == 3, greedy_c
    requests = {  # request id: (prompt, params)
        "a": ([1, 2, 3], SamplingParams(max_tokens=5, temperature=0)),
        "b": ([5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=4, temperature=0.8, n=2, seed=1)),
        "c": (prompt_c, SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[stop_token])),
        "e": ([1] * (CONTEXT + 1), SamplingParams(max_tokens=3)),  # too long: fails with no token
    }

    async def main():
        llm_engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=32))
        gate, entered, real = threading.Event(), threading.Event(), llm_engine.step

        def step():
            entered.set()
            assert gate.wait(TIMEOUT)
            return real()
        llm_engine.step = step
        engine = AsyncEngine(llm_engine)
        # "d" is queued, its consumer leaves while the engine waits at the gate: the step under way
        # gives it one token, then the abort lands
        leaving = asyncio.create_task(anext(engine.generate([3, 3, 3, 3], SamplingParams(max_tokens=9),
                                                            request_id="d")))
        assert await asyncio.to_thread(entered.wait, TIMEOUT)  # "d" added, its first step waits
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        gate.set()
        outs = await asyncio.gather(*[_last(engine.generate(p, sp, request_id=rid))
                                      for rid, (p, sp) in requests.items()])
        deadline = time.monotonic() + TIMEOUT
        while engine.snapshot()["running"] or engine.snapshot()["waiting"]:
            assert time.monotonic() < deadline, "the engine never went idle"
            await asyncio.sleep(0.005)
        text = engine.metrics.render()
        await engine.shutdown(TIMEOUT)
        return dict(zip(requests, outs)), text, llm_engine.stats()
    outs, text, stats = asyncio.run(main())
    assert [len(o.token_ids) for o in outs["b"].outputs] == [4, 4] and len(outs["c"].token_ids) == c_tokens
    assert outs["c"].finish_reason == "stop" and outs["e"].finish_reason == "error"
    parsed = samples(text)
    assert value(parsed, "prompt_tokens_total") == 3 + 7 + 3 + 4  # "e" never ran
    assert value(parsed, "generation_tokens_total") == 5 + 8 + c_tokens + 1
    assert value(parsed, "time_to_first_token_seconds_count") == 4
    assert value(parsed, "inter_token_latency_seconds_count") == 4 + 3 + (c_tokens - 1)  # one per step of each
    assert value(parsed, "e2e_request_latency_seconds_count") == 5
    reasons = {"length": 2, "stop": 1, "abort": 1, "error": 1}
    for reason, count in reasons.items():
        assert value(parsed, "request_success_total", finished_reason=reason) == count
    assert value(parsed, "time_to_first_token_seconds_bucket", le="+Inf") == 4
    assert value(parsed, "time_to_first_token_seconds_sum") > 0
    assert value(parsed, "num_requests_running") == value(parsed, "num_requests_waiting") == 0
    assert value(parsed, "kv_cache_blocks_used") == value(parsed, "kv_cache_usage_perc") == 0
    assert value(parsed, "kv_cache_blocks_total") == 32
    assert value(parsed, "prefix_cache_hit_rate") == stats.hit_rate
    assert value(parsed, "generation_tokens_per_second") > 0


async def _last(agen):
    out = None
    async for out in agen:
        pass
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gauges_histograms_and_tokens_per_second_window():
    clock = FakeClock()
    state = {"running": 3, "waiting": 2, "kv_blocks_used": 10, "kv_blocks_total": 40, "kv_usage": 0.25,
             "prefix_hit_rate": 0.5}
    metrics = ServeMetrics(snapshot=lambda: state, clock=clock)
    metrics.on_first_token(0.003, 11)
    metrics.on_tokens(5)
    clock.now += 4
    metrics.on_tokens(3, 0.02)
    metrics.on_finished("length", 1.2)
    clock.now += 1
    parsed = samples(metrics.render())
    assert value(parsed, "generation_tokens_per_second") == pytest.approx(8 / 5)  # 5 s since the start
    for key, (name, _) in SNAPSHOT_GAUGES.items():
        assert value(parsed, name) == state[key]
    assert value(parsed, "time_to_first_token_seconds_bucket", le="0.0025") == 0
    assert value(parsed, "time_to_first_token_seconds_bucket", le="0.005") == 1
    assert value(parsed, "inter_token_latency_seconds_bucket", le="0.01") == 0
    assert value(parsed, "inter_token_latency_seconds_bucket", le="0.025") == 1
    assert value(parsed, "e2e_request_latency_seconds_sum") == pytest.approx(1.2)
    assert value(parsed, "prompt_tokens_total") == 11 and value(parsed, "generation_tokens_total") == 8
    clock.now += 7  # 12 s in: the first 5 tokens left the 10 s window
    assert value(samples(metrics.render()), "generation_tokens_per_second") == pytest.approx(3 / 10)
    clock.now += 20
    assert value(samples(metrics.render()), "generation_tokens_per_second") == 0


def test_registries_are_separate():
    a, b = ServeMetrics(), ServeMetrics()
    a.on_tokens(4)
    assert value(samples(a.render()), "generation_tokens_total") == 4
    assert value(samples(b.render()), "generation_tokens_total") == 0


def test_running_and_waiting_count_requests_not_sequences(model):
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=32, max_num_seqs=3))
    engine.add_request([1, 2], SamplingParams(max_tokens=5, n=2, seed=0), request_id="pair")
    engine.add_request([3], SamplingParams(max_tokens=5), request_id="one")
    engine.add_request([4], SamplingParams(max_tokens=5), request_id="later")
    assert (engine.num_running, engine.num_waiting) == (0, 3)
    engine.step()  # "pair" forks into 2 sequences and takes 2 of the 3 seats; "one" the third
    assert len(engine.scheduler.running) == 3
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    engine.abort("pair")
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 0)
    async_engine = AsyncEngine(engine)
    snap = async_engine.snapshot()
    assert (snap["running"], snap["waiting"], snap["kv_blocks_used"]) == (2, 0, engine.stats().used)
