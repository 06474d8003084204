"""Pipeline schedules as per-rank action lists: GPipe, 1F1B and interleaved 1F1B.

An ``Action`` is a forward or backward of one micro-batch through one virtual stage (a chunk of
blocks; stage ``s`` lives on rank ``s % pp``). Every rank runs its list in order; a forward of
stage ``s > 0`` waits for stage ``s - 1``'s output, a backward of stage ``s < last`` for stage
``s + 1``'s input gradient (sends are asynchronous, so only these dependencies order the ranks).

Bubble (idle) fraction of a step with forward/backward times ``t_f``/``t_b`` per micro-batch and
rank: GPipe and 1F1B take ``(m + p - 1)(t_f + t_b)`` for ``m (t_f + t_b)`` of work, interleaving
``v`` chunks per rank shrinks the ramp to ``(p - 1)(t_f + t_b) / v`` (Megatron-LM 2021, sec. 2.2):

    bubble_fraction(p, m, v) = (p - 1) / (v * m + p - 1)

(idle time over total time; Megatron's "bubble time fraction" ``(p - 1) / (v m)`` is idle over
ideal time). ``simulate`` measures it from the action lists.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SCHEDULES", "Action", "schedule_actions", "bubble_fraction", "simulate", "check_schedule"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class Action(NamedTuple):
    """``op`` ("forward" or "backward") of ``micro_batch`` through virtual stage ``stage``."""

    op: str
    micro_batch: int
    stage: int


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_schedule(kind: str, pp: int, micro_batches: int, virtual_stages: int = 1) -> None:
    """ValueError naming the argument unless ``kind`` can run ``micro_batches`` on ``pp`` ranks
    with ``virtual_stages`` chunks each."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    _positive_int("pp", pp)
    _positive_int("micro_batches", micro_batches)
    _positive_int("virtual_stages", virtual_stages)
    if kind != "interleaved" and virtual_stages != 1:
        raise ValueError(f"schedule {kind!r} runs one chunk per rank; virtual_stages={virtual_stages} needs "
                         "schedule 'interleaved'")
    if kind == "interleaved" and micro_batches % pp:
        raise ValueError(f"the interleaved schedule needs micro_batches a multiple of pp (Megatron-LM's rule); "
                         f"got micro_batches={micro_batches}, pp={pp}")


def _gpipe(rank: int, pp: int, m: int) -> list[Action]:
    return [Action("forward", i, rank) for i in range(m)] + [Action("backward", i, rank) for i in range(m)]


def _one_f_one_b(rank: int, pp: int, m: int) -> list[Action]:
    warmup = min(pp - rank - 1, m)
    out = [Action("forward", i, rank) for i in range(warmup)]
    for i in range(m - warmup):
        out += [Action("forward", warmup + i, rank), Action("backward", i, rank)]
    out += [Action("backward", i, rank) for i in range(m - warmup, m)]
    return out


def _interleaved(rank: int, pp: int, m: int, v: int) -> list[Action]:
    """Megatron-LM's interleaved 1F1B: the k-th forward of this rank is micro-batch
    ``(k // (p v)) p + k % p`` of chunk ``(k // p) % v``; backwards visit the chunks in reverse."""
    total = m * v

    def chunk_and_batch(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k % (pp * v)) // pp
        return (chunk if forward else v - 1 - chunk), (k // (pp * v)) * pp + k % pp

    def action(op: str, k: int) -> Action:
        chunk, batch = chunk_and_batch(k, op == "forward")
        return Action(op, batch, chunk * pp + rank)

    warmup = total if m == pp else min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    out = [action("forward", k) for k in range(warmup)]
    for k in range(total - warmup):
        out += [action("forward", warmup + k), action("backward", k)]
    out += [action("backward", k) for k in range(total - warmup, total)]
    return out


def schedule_actions(kind: str, pp: int, micro_batches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Per pipeline rank, its ordered actions under schedule ``kind`` ("gpipe", "1f1b",
    "interleaved"): each (micro-batch, virtual stage) of the rank forwarded once, then backwarded once."""
    check_schedule(kind, pp, micro_batches, virtual_stages)
    if kind == "gpipe":
        return [_gpipe(r, pp, micro_batches) for r in range(pp)]
    if kind == "1f1b":
        return [_one_f_one_b(r, pp, micro_batches) for r in range(pp)]
    return [_interleaved(r, pp, micro_batches, virtual_stages) for r in range(pp)]


def bubble_fraction(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a pipeline step: ``(p - 1) / (v m + p - 1)``."""
    _positive_int("pp", pp)
    _positive_int("micro_batches", micro_batches)
    _positive_int("virtual_stages", virtual_stages)
    return (pp - 1) / (virtual_stages * micro_batches + pp - 1)


def _dependency(action: Action, last_stage: int) -> Action | None:
    """The action on another virtual stage that ``action`` waits for (None: only its own rank's order)."""
    if action.op == "forward":
        return Action("forward", action.micro_batch, action.stage - 1) if action.stage > 0 else None
    if action.stage < last_stage:
        return Action("backward", action.micro_batch, action.stage + 1)
    return None


def simulate(actions: list[list[Action]], forward_time: float = 1.0, backward_time: float = 2.0) -> dict:
    """Run the per-rank action lists with each forward (backward) of a virtual stage taking
    ``forward_time / v`` (``backward_time / v``) and free communication; returns ``{"finish":
    {action: time}, "makespan": t, "bubble": idle fraction}``. ValueError when the lists deadlock,
    repeat an action, or a backward comes before its forward on its rank."""
    pp = len(actions)
    stages = {a.stage for rank in actions for a in rank}
    v = len(stages) // pp if stages else 1
    last = max(stages, default=0)
    duration = {"forward": forward_time / v, "backward": backward_time / v}
    finish: dict[Action, float] = {}
    position, clock = [0] * pp, [0.0] * pp
    for rank_actions in actions:
        if len(set(rank_actions)) != len(rank_actions):
            raise ValueError("a rank's schedule repeats an action")
    while any(position[r] < len(actions[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(actions[r]):
                a = actions[r][position[r]]
                if a.op == "backward" and Action("forward", a.micro_batch, a.stage) not in finish:
                    raise ValueError(f"rank {r}: {a} before its forward")
                dep = _dependency(a, last)
                if dep is not None and dep not in finish:
                    break
                start = max(clock[r], finish[dep] if dep is not None else 0.0)
                clock[r] = finish[a] = start + duration[a.op]
                position[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: actions[r][position[r]] for r in range(pp) if position[r] < len(actions[r])}
            raise ValueError(f"the schedule deadlocks: every rank waits ({stuck})")
    makespan = max(finish.values(), default=0.0)
    busy = sum(duration[a.op] for a in actions[0])
    return {"finish": finish, "makespan": makespan, "bubble": 1.0 - busy / makespan if makespan else 0.0}
