"""The engine in a process of its own (``RemoteEngine``, ``parallax serve``'s default): it gives what
the engine in the server's thread gives, errors cross the pipe as the local engine raises them,
an abort frees the blocks, Ctrl-C does not reach it, and a dead engine process ends its streams
instead of leaving them hanging. (The OpenAI API over it: ``test_openai_api``'s adapter test.)"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from parallax.inference import SamplingParams
from parallax.serve.async_engine import EngineStoppedError
from parallax.serve.engine_process import EngineProcessError, EngineSpec, RemoteEngine
from tests.serve.conftest import make_engine

PROMPTS = ["The history of", "A list is", "Once upon a time, there"]


async def _answers(engine, prompts: list[str], params: SamplingParams, tag: str, lora: str | None = None) -> list:
    async def one(i: int, prompt: str):
        last = None
        async for out in engine.generate(engine.engine.encode(prompt), params, request_id=f"{tag}-{i}", lora=lora,
                                          prompt=prompt):
            last = out
        return [(o.text, o.token_ids, o.finish_reason, o.logprobs) for o in last.outputs]

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def _assert_same(got: list, expected: list) -> None:
    """Texts, tokens and finish reasons equal; logprobs to float rounding (the engine process runs
    one torch thread, this one may run more: sums in another order)."""
    assert [[sample[:3] for sample in answer] for answer in got] == \
        [[sample[:3] for sample in answer] for answer in expected]
    for answer, reference in zip(got, expected):
        for sample, ref in zip(answer, reference):
            assert (sample[3] is None) == (ref[3] is None)
            for lp, ref_lp in zip(sample[3] or [], ref[3] or []):
                assert lp.token_id == ref_lp.token_id and lp.logprob == pytest.approx(ref_lp.logprob, abs=1e-5)
                assert [t for t, _ in lp.top] == [t for t, _ in ref_lp.top]
                assert [v for _, v in lp.top] == pytest.approx([v for _, v in ref_lp.top], abs=1e-5)


async def _idle(engine, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = engine.snapshot()
        if state["running"] == state["waiting"] == state["kv_blocks_used"] == 0:
            return state
        assert time.monotonic() < deadline, f"not idle after {timeout} s: {state}"
        await asyncio.sleep(0.01)


def test_the_engine_process_gives_what_the_engine_thread_gives(hf_dir, adapter_dirs):
    local = make_engine(hf_dir, loras={"alpha": adapter_dirs["alpha"]})
    remote = make_engine(hf_dir, loras={"alpha": adapter_dirs["alpha"]}, engine_process=True)
    process = remote.engine
    assert isinstance(process, RemoteEngine) and process.pid != os.getpid()
    asked_ahead = []  # AsyncEngine lets the engine process step while it hands outputs over
    start_step = process.start_step
    process.start_step = lambda: (asked_ahead.append(1), start_step())[1]
    cases = [(SamplingParams(max_tokens=12, temperature=0), None),
             (SamplingParams(max_tokens=9, temperature=0.9, top_p=0.9, seed=7, n=2, logprobs=2), None),
             (SamplingParams(max_tokens=10, temperature=0), "alpha")]

    async def run() -> None:
        try:
            for k, (params, lora) in enumerate(cases):
                expected = await _answers(local, PROMPTS, params, f"l{k}", lora)
                _assert_same(await _answers(remote, PROMPTS, params, f"r{k}", lora), expected)
            state = await _idle(remote)
            assert state["num_steps"] > 0 and state["kv_blocks_total"] == 256
            assert len(asked_ahead) == state["num_steps"]

            # the engine's own refusals cross the pipe as the local engine raises them
            with pytest.raises(ValueError, match="lora"):
                await _answers(remote, PROMPTS[:1], SamplingParams(max_tokens=2), "bad", lora="nope")
            with pytest.raises(ValueError, match="alpha"):
                await remote.add_lora("alpha", str(adapter_dirs["alpha"]))
            await remote.add_lora("beta", str(adapter_dirs["beta"]))
            assert remote.lora_names == ["alpha", "beta"]

            # a consumer that goes away mid-stream aborts its request: its blocks come back
            stream = remote.open(process.encode(PROMPTS[0]), SamplingParams(max_tokens=400, temperature=0),
                                 request_id="cut")
            first = await stream.get()
            assert not first.finished and remote.snapshot()["kv_blocks_used"] > 0
            stream.close()
            await _idle(remote)

            # Ctrl-C reaches the process group: the engine process keeps serving
            os.kill(process.pid, signal.SIGINT)
            await asyncio.sleep(0.2)
            expected = await _answers(local, PROMPTS[:1], cases[0][0], "l-int")
            _assert_same(await _answers(remote, PROMPTS[:1], cases[0][0], "r-int"), expected)
        finally:
            await local.shutdown(1)
            await remote.shutdown(1)

    asyncio.run(run())
    assert process._process.exitcode == 0  # shutdown closed it
    with pytest.raises(EngineProcessError, match="closed"):
        process.step()
    process.close()  # again: nothing to do


def test_the_next_step_is_asked_for_before_the_last_ones_outputs_are_handed_over(hf_dir):
    """AsyncEngine records and hands a step's outputs over while the engine process runs the next
    step: each step's outputs are delivered after the next one was asked for (the last excepted)."""
    engine = make_engine(hf_dir, engine_process=True)
    process, events = engine.engine, []
    start_step, step, deliver = process.start_step, process.step, engine._deliver_all
    process.start_step = lambda: (events.append("ask"), start_step())[1]
    process.step = lambda: (step(), events.append("got"))[0]
    engine._deliver_all = lambda outputs: (events.append(f"deliver {len(outputs)}"), deliver(outputs))[1]

    async def run() -> None:
        try:
            answers = await _answers(engine, PROMPTS[:1], SamplingParams(max_tokens=5, temperature=0), "r")
            assert len(answers[0][0][1]) == 5
            assert events == ["ask", "got"] + ["ask", "deliver 1", "got"] * 4 + ["deliver 1"]
        finally:
            await engine.shutdown(1)

    asyncio.run(run())


def test_an_abort_that_comes_before_the_last_outputs_are_delivered_leaves_them_whole(hf_dir):
    """A consumer that goes away after its request ended in a step but before that step's outputs
    were handed over (they wait for the next step to be asked for): the abort finds nothing to stop,
    and the request still ends as the engine ended it, in the stream and in the metrics."""
    engine = make_engine(hf_dir, engine_process=True)
    process = engine.engine
    step = process.step

    def step_then_abort_the_finished():  # the consumer's close lands in the window, every time
        outputs = step()
        for out in outputs:
            if out.finished:
                engine._commands.put(("abort", out.request_id))
        return outputs

    process.step = step_then_abort_the_finished

    async def run() -> None:
        try:
            stream = engine.open(process.encode(PROMPTS[0]), SamplingParams(max_tokens=3, temperature=0),
                                 request_id="r")
            out = await asyncio.wait_for(stream.get(), timeout=30)
            while not out.finished:
                out = await asyncio.wait_for(stream.get(), timeout=30)
            assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
            await _idle(engine)
            finished = engine.metrics.request_success.labels(finished_reason="length")._value.get()
            assert finished == 1 and not engine._active
        finally:
            await engine.shutdown(1)

    asyncio.run(run())


def test_a_step_asked_ahead_runs_while_the_caller_goes_on(hf_dir):
    """``start_step`` returns at once and the engine process runs the step; a call made meanwhile is
    answered after it (its counters show that step); ``step`` then returns that step's outputs."""
    from parallax.data import load_tokenizer

    remote = RemoteEngine(EngineSpec(hf=str(hf_dir), device="cpu", threads=1))
    try:
        ids = load_tokenizer(hf_dir).encode(PROMPTS[0])
        remote.add_request(None, SamplingParams(max_tokens=3, temperature=0), "r", prompt_token_ids=ids)
        assert [len(o.outputs[0].token_ids) for o in remote.step()] == [1] and remote.num_steps == 1
        remote.start_step()
        remote.start_step()  # one step in flight at most
        assert remote.has_unfinished_requests()
        remote.stats()  # answered once the step asked for is done
        assert remote.num_steps == 2
        assert [len(o.outputs[0].token_ids) for o in remote.step()] == [2] and remote.num_steps == 2
        remote.start_step()
        last = remote.step()
        assert remote.num_steps == 3 and last[0].finished and not remote.has_unfinished_requests()
        assert remote.blocks.num_available == remote.blocks.num_blocks
    finally:
        remote.close()


def test_a_killed_engine_process_ends_its_streams(hf_dir):
    engine = make_engine(hf_dir, engine_process=True)
    process = engine.engine

    async def run() -> None:
        stream = engine.open(process.encode(PROMPTS[0]), SamplingParams(max_tokens=400, temperature=0),
                             request_id="doomed")
        await stream.get()
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(EngineStoppedError):  # not a hang
            while True:
                await asyncio.wait_for(stream.get(), timeout=30)
        with pytest.raises(EngineStoppedError):
            engine.open(process.encode(PROMPTS[1]), SamplingParams(max_tokens=2), request_id="after")
        await engine.shutdown(1)

    asyncio.run(run())
    assert process._process.exitcode == -signal.SIGKILL


def test_cpu_affinity_pins_the_engine_process_only(hf_dir):
    """The engine process runs on the cores its spec names (the threads torch starts there inherit
    them); the process that started it keeps its own; a core it may not use is a ValueError."""
    cores = sorted(os.sched_getaffinity(0))
    mine = set(cores)
    remote = RemoteEngine(EngineSpec(hf=str(hf_dir), device="cpu", cpu_affinity=frozenset(cores[-1:])))
    try:
        assert os.sched_getaffinity(remote.pid) == {cores[-1]}
        assert remote.where.endswith(f", cores {cores[-1]}")
        assert os.sched_getaffinity(0) == mine
    finally:
        remote.close()
    with pytest.raises(ValueError, match="cpu_affinity 4095: Invalid argument"):
        RemoteEngine(EngineSpec(hf=str(hf_dir), device="cpu", cpu_affinity=frozenset({4095})))


@pytest.mark.parametrize("cores", [frozenset(), {0}, frozenset({-1}), frozenset({True}), [0, 1]])
def test_a_bad_cpu_affinity_is_refused_naming_it(cores):
    with pytest.raises(ValueError, match="cpu_affinity must be None or a non-empty frozenset"):
        EngineSpec(hf="x", cpu_affinity=cores)


def test_a_spec_that_cannot_load_raises_the_engine_process_message(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        RemoteEngine(EngineSpec(hf=str(tmp_path), device="cpu", threads=1))
    with pytest.raises(ValueError, match="spec must be an EngineSpec"):
        RemoteEngine({"hf": str(tmp_path)})
