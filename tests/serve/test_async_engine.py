"""``AsyncEngine``: the engine thread driven from asyncio, on a small random GPT on CPU.

Outputs must equal ``LLM.generate``; a request added while others run joins the next steps
(counted in engine steps, not time); a consumer that stops iterating frees its KV blocks before
the engine's next step; a full queue, a shutdown and a failing step each end requests the
documented way; the engine thread sleeps when idle and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import random
import threading
import time

import pytest
import torch
from tests.helpers import context_sensitive_gpt
from parallax.models import GPT

import parallax as px
from parallax.inference import LLM, EngineConfig, LLMEngine, SamplingParams
from parallax.serve.async_engine import STEP_ERROR, AsyncEngine, EngineStoppedError, QueueFullError

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

CONTEXT = 64
VOCAB = 128
TIMEOUT = 20.0  # seconds any single wait in these tests may take before it counts as a hang


@pytest.fixture(scope="module")
def model() -> GPT:
    return context_sensitive_gpt(block_size=CONTEXT, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)


def make_engine(model: GPT, **config) -> LLMEngine:
    config = {"block_size": 8, "num_blocks": 48, "max_num_seqs": 16, **config}
    return LLMEngine(model, config=EngineConfig(**config))


def prompts_for(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.choice([1, 4, 9, 17, 30]))] for _ in range(count)]


async def collect(agen) -> list:
    return [out async for out in agen]


async def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def record_steps(engine: LLMEngine, delay: float = 0.0) -> list[set[str]]:
    """Wrap ``engine.step``: the ids of the requests each step returned outputs for, in order.
    ``delay``: seconds each step sleeps first (GIL released, as in a bigger model's step)."""
    log: list[set[str]] = []
    real = engine.step

    def step():
        time.sleep(delay)
        outputs = real()
        log.append({o.request_id for o in outputs})
        return outputs
    engine.step = step
    return log


def test_concurrent_requests_equal_llm_generate(model):
    prompts = prompts_for(0, 24)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (1, 5, 12, 20) * 6]
    params[3] = SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, n=3, seed=7)  # seeded sampling too
    ref = LLM(model, block_size=8, num_blocks=48).generate(prompts, params)

    async def main():
        engine = AsyncEngine(make_engine(model, max_num_seqs=8, num_blocks=10))  # tight: preempts
        streams = await asyncio.gather(*[collect(engine.generate(p, sp, request_id=f"r{i}"))
                                         for i, (p, sp) in enumerate(zip(prompts, params))])
        snap = engine.snapshot()
        await engine.shutdown(TIMEOUT)
        return streams, snap, engine
    streams, snap, engine = asyncio.run(main())
    for outs, expected in zip(streams, ref):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        for before, after in zip(outs, outs[1:]):  # cumulative
            assert after.token_ids[:len(before.token_ids)] == before.token_ids
        assert [o.token_ids for o in outs[-1].outputs] == [o.token_ids for o in expected.outputs]
        assert outs[-1].finish_reason == "length"
    assert engine.engine.num_preemptions > 0
    # a consumer that saw its request end sees its blocks freed in the snapshot
    assert snap["running"] == snap["waiting"] == snap["kv_blocks_used"] == 0
    assert engine.engine.stats().used == 0


def test_a_step_wakes_the_event_loop_once(model):
    """A step's outputs for every request reach their consumers with one wake-up of the loop (one
    per request cost a self-pipe write and a callback each: 64 a step at 64 streams)."""
    async def main():
        engine = AsyncEngine(make_engine(model, max_num_seqs=8))
        steps = record_steps(engine.engine, delay=0.01)  # consumers keep up: every output is taken
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            wakeups.append(threading.current_thread().name)
            return real(callback, *args, **kwargs)
        loop.call_soon_threadsafe = counting
        streams = await asyncio.gather(*[collect(engine.generate(p, SamplingParams(max_tokens=6, temperature=0),
                                                                 request_id=f"r{i}"))
                                         for i, p in enumerate(prompts_for(1, 8))])
        await engine.shutdown(TIMEOUT)
        return streams, steps, wakeups
    streams, steps, wakeups = asyncio.run(main())
    assert all(outs[-1].finished for outs in streams)
    outputs = sum(len(s) for s in steps)
    assert outputs >= 40  # 8 requests x 6 tokens, some steps with several requests
    engine_wakeups = [name for name in wakeups if name == "parallax-engine"]
    assert len(engine_wakeups) <= len(steps) + 1, (len(engine_wakeups), len(steps), outputs)


def test_request_added_while_others_run_is_admitted_at_once(model):
    """A short request added while a long one runs gets its tokens in the very next steps,
    alongside the long one, instead of waiting for it."""
    async def main():
        llm_engine = make_engine(model)
        steps = record_steps(llm_engine, delay=0.002)  # the long request lasts >= 80 ms, even on a busy machine
        real_add, added_at = llm_engine.add_request, []

        def add_request(*args, **kwargs):  # runs in the engine thread, between steps
            added_at.append(len(steps))
            return real_add(*args, **kwargs)
        llm_engine.add_request = add_request
        engine = AsyncEngine(llm_engine)
        long = engine.generate([1, 2, 3], SamplingParams(max_tokens=40, temperature=0), request_id="long")
        seen = [await long.__anext__() for _ in range(3)]
        short = await collect(engine.generate([5, 6], SamplingParams(max_tokens=4, temperature=0), request_id="short"))
        rest = await collect(long)
        await engine.shutdown(TIMEOUT)
        return steps, added_at, seen + rest, short
    steps, added_at, long_outs, short_outs = asyncio.run(main())
    short_steps = [i for i, ids in enumerate(steps) if "short" in ids]
    long_steps = [i for i, ids in enumerate(steps) if "long" in ids]
    assert len(short_steps) == 4 and len(long_steps) == 40
    assert added_at[0] == 0 and added_at[1] >= 3
    assert short_steps[0] == added_at[1]  # the first step after it was added
    assert short_steps == list(range(short_steps[0], short_steps[0] + 4))  # 4 consecutive steps ...
    assert all(i in long_steps for i in short_steps) and long_steps[-1] > short_steps[-1]  # ... shared with long
    assert len(short_outs[-1].token_ids) == 4 and len(long_outs[-1].token_ids) == 40


@pytest.mark.parametrize("how", ["aclose", "cancel", "break"])
def test_consumer_leaving_aborts_and_frees_blocks_before_the_next_step(model, how):
    """At most the step already under way when the consumer leaves still runs the request; the
    following ones do not, and its blocks are free."""
    async def main():
        llm_engine = make_engine(model)
        steps = record_steps(llm_engine)
        engine = AsyncEngine(llm_engine)
        other = asyncio.create_task(collect(engine.generate([9, 9, 9], SamplingParams(max_tokens=30, temperature=0),
                                                            request_id="other")))
        agen = engine.generate(list(range(20)), SamplingParams(max_tokens=50, temperature=0), request_id="gone")
        if how == "aclose":
            await agen.__anext__()
            await agen.__anext__()
            await agen.aclose()
        elif how == "cancel":
            got = asyncio.Event()

            async def consume():
                async for _ in agen:
                    got.set()
            task = asyncio.create_task(consume())
            await got.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            async for out in agen:
                if len(out.token_ids) >= 2:
                    break
            del agen, out
            gc.collect()  # the loop's async-generator finalizer schedules aclose()
        await wait_until(lambda: "gone" not in engine._streams, "the generator to close")  # abort queued
        left_at = len(steps)
        assert len((await other)[-1].token_ids) == 30  # the other request is unaffected
        await wait_until(lambda: engine.snapshot()["running"] == 0, "the engine to go idle")
        await engine.shutdown(TIMEOUT)
        return steps, left_at, engine
    steps, left_at, engine = asyncio.run(main())
    assert sum("gone" in ids for ids in steps[left_at:]) <= 1
    assert sum("gone" in ids for ids in steps) < 50
    assert engine.engine.stats().used == 0 and not engine.engine.has_unfinished_requests()
    assert engine.metrics.request_success.labels(finished_reason="abort")._value.get() == 1


def gate_steps(engine: LLMEngine) -> threading.Event:
    """Make every engine step wait for the returned event to be set."""
    gate = threading.Event()
    real = engine.step

    def step():
        assert gate.wait(TIMEOUT), "the test never opened the gate"
        return real()
    engine.step = step
    return gate


def test_queue_full_raises_with_retry_after(model):
    async def main():
        llm_engine = make_engine(model, max_num_seqs=1)
        gate = gate_steps(llm_engine)
        engine = AsyncEngine(llm_engine, max_waiting=2)
        tasks = [asyncio.create_task(collect(engine.generate([i + 1], SamplingParams(max_tokens=3, temperature=0),
                                                             request_id=f"r{i}"))) for i in range(2)]
        await wait_until(lambda: engine.snapshot()["waiting"] == 2, "two waiting requests")
        with pytest.raises(QueueFullError) as info:
            await engine.generate([7], SamplingParams(max_tokens=3), request_id="r2").__anext__()
        assert info.value.retry_after >= 1
        gate.set()
        done = await asyncio.gather(*tasks)
        assert [len(outs[-1].token_ids) for outs in done] == [3, 3]
        # room again; the estimate now follows the measured finish rate
        after = await collect(engine.generate([7], SamplingParams(max_tokens=3), request_id="r2"))
        await engine.shutdown(TIMEOUT)
        return after
    assert asyncio.run(main())[-1].finished


def test_bad_input_raises_at_the_first_anext(model):
    async def main():
        engine = AsyncEngine(make_engine(model, max_num_seqs=4))
        cases = [([], SamplingParams(), "prompt_token_ids"), ([VOCAB], SamplingParams(), "prompt_token_ids"),
                 ([1], {"max_tokens": 3}, "params"), ([1], SamplingParams(n=5), "max_num_seqs"),  # from add_request
                 ([1], SamplingParams(stop=["x"]), "stop")]
        for ids, params, field in cases:
            with pytest.raises(ValueError, match=field):
                await engine.generate(ids, params, request_id="x").__anext__()
        with pytest.raises(ValueError, match="request_id"):
            await engine.generate([1], SamplingParams(), request_id="").__anext__()
        first = engine.generate([1, 2], SamplingParams(max_tokens=30, temperature=0), request_id="dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate([1], SamplingParams(), request_id="dup").__anext__()
        rest = await collect(first)
        await engine.shutdown(TIMEOUT)
        return rest, engine
    rest, engine = asyncio.run(main())
    assert len(rest[-1].token_ids) == 30 and engine.engine.stats().used == 0


def test_shutdown_drains_then_refuses(model):
    async def main():
        engine = AsyncEngine(make_engine(model))
        tasks = [asyncio.create_task(collect(engine.generate(p, SamplingParams(max_tokens=12, temperature=0),
                                                             request_id=str(i))))
                 for i, p in enumerate(prompts_for(1, 5))]
        await wait_until(lambda: engine.snapshot()["num_steps"] > 0, "a first step")
        await engine.shutdown(TIMEOUT)
        with pytest.raises(EngineStoppedError):
            await engine.generate([1], SamplingParams(), request_id="late").__anext__()
        with pytest.raises(EngineStoppedError):
            await engine.add_lora("x", "/nonexistent")
        return await asyncio.gather(*tasks), engine
    done, engine = asyncio.run(main())
    assert all(outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 12 for outs in done)
    assert not engine._thread.is_alive()


def test_shutdown_aborts_what_is_left_after_the_timeout(model):
    async def main():
        llm_engine = make_engine(model)
        real = llm_engine.step

        def slow_step():
            time.sleep(0.02)
            return real()
        llm_engine.step = slow_step
        engine = AsyncEngine(llm_engine)
        tasks = [asyncio.create_task(collect(engine.generate(p, SamplingParams(max_tokens=40, temperature=0, n=2),
                                                             request_id=str(i))))
                 for i, p in enumerate(prompts_for(2, 3))]
        await wait_until(lambda: engine.snapshot()["num_steps"] > 1, "running requests")
        await engine.shutdown(0.1)  # 40 tokens take 40 steps of 20 ms
        return await asyncio.gather(*tasks), engine
    done, engine = asyncio.run(main())
    for outs in done:
        assert outs[-1].finished and [o.finish_reason for o in outs[-1].outputs] == ["abort", "abort"]
        assert 0 < len(outs[-1].token_ids) < 40
    assert engine.engine.stats().used == 0 and not engine._thread.is_alive()


def test_a_failing_step_ends_the_requests_in_flight_and_the_loop_goes_on(model, caplog):
    prompt = [3, 1, 4, 1, 5]
    expected = LLM(model, block_size=8, num_blocks=48).generate([prompt], SamplingParams(max_tokens=8, temperature=0))

    async def main():
        llm_engine = make_engine(model)
        real, calls = llm_engine.runner.forward, [0]

        def forward(*args):  # the third model call fails (after blocks were allocated)
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("boom in the model")
            return real(*args)
        llm_engine.runner.forward = forward
        gate = gate_steps(llm_engine)
        engine = AsyncEngine(llm_engine)
        tasks = [asyncio.create_task(collect(engine.generate(p, SamplingParams(max_tokens=20, logprobs=1),
                                                             request_id=str(i))))
                 for i, p in enumerate(prompts_for(3, 3))]
        await wait_until(lambda: engine.snapshot()["waiting"] == 3, "three queued requests")
        gate.set()  # all three run in the failing step
        failed = await asyncio.gather(*tasks)
        after = await collect(engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0), request_id="ok"))
        await engine.shutdown(TIMEOUT)
        return failed, after, engine
    with caplog.at_level(logging.ERROR, logger="parallax.serve.async_engine"):
        failed, after, engine = asyncio.run(main())
    for outs in failed:
        last = outs[-1]
        assert last.finished and last.error == STEP_ERROR and last.finish_reason == "error"
        assert last.token_ids == [] and last.outputs[0].logprobs == []
        assert "boom" not in last.error
    [record] = [r for r in caplog.records if "step failed" in r.getMessage()]
    assert record.exc_info and "boom in the model" in str(record.exc_info[1])
    assert after[-1].token_ids == expected[0].token_ids
    assert engine.engine.stats().used == 0


def test_add_lora_runs_in_the_engine_thread_between_steps(model):
    async def main():
        llm_engine = make_engine(model)
        in_step, calls = threading.Event(), []
        real = llm_engine.step

        def step():
            in_step.set()
            try:
                return real()
            finally:
                in_step.clear()

        def add_lora(name, path):  # stands in for LLMEngine.add_lora
            calls.append((name, path, threading.current_thread().name, in_step.is_set()))
            if name == "bad":
                raise ValueError("lora_path: no adapter there")
        llm_engine.step, llm_engine.add_lora = step, add_lora
        engine = AsyncEngine(llm_engine)
        task = asyncio.create_task(collect(engine.generate([1, 2], SamplingParams(max_tokens=30, temperature=0),
                                                           request_id="r")))
        await wait_until(lambda: engine.snapshot()["num_steps"] > 2, "running request")
        await engine.add_lora("a1", "/adapters/a1")
        with pytest.raises(ValueError, match="lora_path"):
            await engine.add_lora("bad", "/nowhere")
        outs = await task
        await engine.shutdown(TIMEOUT)
        return calls, outs
    calls, outs = asyncio.run(main())
    assert calls == [("a1", "/adapters/a1", "parallax-engine", False), ("bad", "/nowhere", "parallax-engine", False)]
    assert len(outs[-1].token_ids) == 30


def test_idle_thread_sleeps_and_the_loop_stays_responsive(model):
    async def main():
        llm_engine = make_engine(model)
        real = llm_engine.step

        def slow_step():  # a step that holds the engine thread (the GIL is released, as in a model call)
            time.sleep(0.01)
            return real()
        llm_engine.step = slow_step
        engine = AsyncEngine(llm_engine)
        engine.start()
        cpu = time.process_time()
        await asyncio.sleep(0.3)
        idle_cpu = time.process_time() - cpu
        ticks = 0
        task = asyncio.create_task(collect(engine.generate([1], SamplingParams(max_tokens=30), request_id="r")))
        while not task.done():
            await asyncio.sleep(0.001)
            ticks += 1
        await engine.shutdown(TIMEOUT)
        return idle_cpu, ticks
    idle_cpu, ticks = asyncio.run(main())
    assert idle_cpu < 0.05, f"the idle engine thread used {idle_cpu:.3f} s of CPU in 0.3 s"
    assert ticks >= 30, f"the event loop ran only {ticks} times during 30 steps of 10 ms"


def test_a_broken_loop_stops_the_engine_instead_of_hanging_clients(model, caplog):
    async def main():
        llm_engine = make_engine(model)
        calls = [0]

        def broken():  # the loop's own bookkeeping fails (a bug), not a model step
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("loop bug")
            return False
        llm_engine.has_unfinished_requests = broken
        engine = AsyncEngine(llm_engine)
        with pytest.raises(EngineStoppedError):
            await collect(engine.generate([1, 2], SamplingParams(max_tokens=3), request_id="r"))
        with pytest.raises(EngineStoppedError):
            await engine.generate([1, 2], SamplingParams(max_tokens=3), request_id="s").__anext__()
        await asyncio.wait_for(engine.shutdown(TIMEOUT), TIMEOUT)
    with caplog.at_level(logging.ERROR, logger="parallax.serve.async_engine"):
        asyncio.run(main())
    assert any("loop stopped" in r.getMessage() and r.exc_info for r in caplog.records)


def test_adapters_added_while_serving_route_per_request(model, tmp_path):
    """A LoRA adapter loaded through the loop while a base request runs; then requests for it and
    for the base in one batch give what ``LLM.generate`` gives; an unknown name is refused."""
    torch.manual_seed(1)
    adapted = px.peft.get_peft_model(copy.deepcopy(model), px.peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    adapted.save_adapter(tmp_path / "a")
    prompts = prompts_for(4, 6)
    loras = ["a", None] * 3
    greedy = SamplingParams(max_tokens=8, temperature=0)
    llm = LLM(copy.deepcopy(model), block_size=8, num_blocks=48)
    llm.add_lora("a", tmp_path / "a")
    expected = llm.generate(prompts, greedy, lora=loras)
    assert [o.token_ids for o in expected[0::2]] != [o.token_ids for o in LLM(model, block_size=8, num_blocks=48)
                                                      .generate(prompts[0::2], greedy)], "the adapter changes nothing"

    async def main():
        engine = AsyncEngine(make_engine(copy.deepcopy(model)))
        base = asyncio.create_task(collect(engine.generate([1, 2], SamplingParams(max_tokens=30, temperature=0),
                                                           request_id="base")))
        await wait_until(lambda: engine.snapshot()["num_steps"] > 2, "a running request")
        await engine.add_lora("a", str(tmp_path / "a"))
        assert engine.lora_names == ["a"]
        with pytest.raises(ValueError, match="lora"):
            await engine.generate([1], greedy, request_id="x", lora="nope").__anext__()
        outs = await asyncio.gather(*[collect(engine.generate(p, greedy, request_id=str(i), lora=name))
                                      for i, (p, name) in enumerate(zip(prompts, loras))])
        await base
        await engine.shutdown(TIMEOUT)
        return [o[-1] for o in outs]
    got = asyncio.run(main())
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.lora for o in got] == loras


def test_a_slow_consumer_gets_the_latest_output_only(model):
    """Outputs are cumulative: a consumer that reads after the request ended gets one output, the
    final one, instead of one per step piled up."""
    async def main():
        engine = AsyncEngine(make_engine(model))
        agen = engine.generate([4, 2], SamplingParams(max_tokens=20, temperature=0), request_id="slow")
        first = await agen.__anext__()
        stream = engine._streams["slow"]
        await wait_until(lambda: stream.latest is not None and stream.latest.finished, "the final output")
        rest = await collect(agen)
        await engine.shutdown(TIMEOUT)
        return first, rest
    first, rest = asyncio.run(main())
    expected = LLM(model, block_size=8, num_blocks=48).generate([[4, 2]], SamplingParams(max_tokens=20, temperature=0))
    assert len(first.token_ids) >= 1 and len(rest) == 1 and rest[0].finished
    assert rest[0].token_ids == expected[0].token_ids


def test_a_failing_add_request_is_reported_and_the_loop_goes_on(model, caplog):
    async def main():
        llm_engine = make_engine(model)
        real = llm_engine.add_request

        def add_request(prompt, params, request_id, **kwargs):
            if request_id == "bug":
                raise KeyError("secret internals")
            return real(prompt, params, request_id, **kwargs)
        llm_engine.add_request = add_request
        engine = AsyncEngine(llm_engine)
        with pytest.raises(RuntimeError) as info:
            await engine.generate([1], SamplingParams(), request_id="bug").__anext__()
        ok = await collect(engine.generate([1], SamplingParams(max_tokens=2), request_id="ok"))
        await engine.shutdown(TIMEOUT)
        return info.value, ok
    with caplog.at_level(logging.ERROR, logger="parallax.serve.async_engine"):
        error, ok = asyncio.run(main())
    assert str(error) == STEP_ERROR and len(ok[-1].token_ids) == 2
    assert any("secret internals" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_open_and_listen_push_outputs_and_close_aborts(model):
    """``open`` + ``listen``: every output reaches the callback on the loop (cumulative, the same
    tokens as ``LLM.generate``, the last one finished); closing a stream whose request runs aborts it
    and frees its blocks; a listened stream refuses ``get``."""
    prompts = prompts_for(5, 3)
    params = SamplingParams(max_tokens=12, temperature=0)
    expected = LLM(model, block_size=8, num_blocks=48).generate(prompts, params)

    async def main():
        llm_engine = make_engine(model)
        record_steps(llm_engine, delay=0.002)  # the long request runs for 0.1 s at least
        engine = AsyncEngine(llm_engine)
        loop = asyncio.get_running_loop()
        got: dict[int, list] = {0: [], 1: []}
        threads: set[str] = set()
        done = asyncio.Event()

        def sink(i, item):
            threads.add(threading.current_thread().name)
            assert asyncio.get_running_loop() is loop
            got[i].append(item)
            if all(outs and outs[-1].finished for outs in got.values()):
                done.set()
        streams = [engine.open(p, params, request_id=f"r{i}") for i, p in enumerate(prompts[:2])]
        first = await streams[0].get()  # pull first, then push: nothing is lost in between
        got[0].append(first)
        for i, stream in enumerate(streams):
            stream.listen(lambda item, i=i: sink(i, item))
        with pytest.raises(RuntimeError, match="listener"):
            await streams[1].get()
        long = engine.open([1, 2], SamplingParams(max_tokens=60, temperature=0), request_id="long")
        await long.get()
        await asyncio.wait_for(done.wait(), TIMEOUT)
        for stream in streams:
            stream.close()  # finished: no abort
        long.close()
        long.close()  # twice is fine
        await wait_until(lambda: engine.snapshot()["running"] == 0, "the engine to go idle")
        await engine.shutdown(TIMEOUT)
        return got, threads, engine
    got, threads, engine = asyncio.run(main())
    assert threads == {"MainThread"}
    for outs, ref in zip(got.values(), expected):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].token_ids == ref.token_ids
    assert engine.engine.stats().used == 0
    assert engine.metrics.request_success.labels(finished_reason="abort")._value.get() == 1
