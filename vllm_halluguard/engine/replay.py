"""Preempted requests replay their decode steps (scheduler side), so they recompute exactly.

vLLM preempts by recomputing: the request's KV blocks are freed, ``num_computed_tokens`` goes back to
0, and when the request is scheduled again its prompt *and* its generated tokens are prefilled, in one
chunk or several, starting after whatever the prefix cache still holds. In the worker the request is
admitted again with a fresh method state (:mod:`.runtime`).

A chunked recompute is exact for the methods whose generated tokens are computed the same way in a
chunk as in a decode step (FarSight's per-position sinks, SCR's edit of the prompt's image rows). It
is not for methods whose decode steps carry state (:attr:`~vllm_halluguard.engine.base.EngineMethod.
replays_decode`): KVSmooth smooths each generated token's cached K/V after its step, with a lambda
ranked among the entropies of the steps before (a chunk would cache raw K/V and push no entropy);
PruneHal decides after each step which image keys the next steps see. A request with such a method
(alone or in a composition) therefore recomputes the way it first ran:

* **prefix-cache reads end before its prompt's last token** (:func:`cache_hit_limit`), as on its first
  admission, whatever blocks of its own generated tokens are still cached;
* **the prompt** is prefilled in chunks as vLLM schedules them, ending with the prompt's last token
  (:func:`replay_tokens`);
* **every generated token is then scheduled alone**, one per step, exactly like the decode step that
  first consumed it; vLLM discards the token such a step samples (a partial prefill), and the step of
  the last generated token samples the next one, as the interrupted decode would have.

Each replayed step runs the method's ordinary decode path in the worker (entropy push, rank lambda and
EMA; measure and prune vote), so the cache and the state end where the unpreempted run left them. The
cost: a resumed request with ``n`` generated tokens needs ``n`` engine steps to catch up instead of one
chunk (the same work as its original decode steps, spread over steps), and reads no cached blocks past
its prompt.

A step that would still compute such a request's generated tokens several at once (another scheduler
patch, an external KV load past the prompt) fails the request with an error (:func:`breaks_replay`),
rather than answering with a silently different state.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: Scheduler counters (in ``scheduler._halluguard_stats``, see :mod:`.two_pass`): generated tokens
#: scheduled one per step for a replay, and requests failed because a step broke their replay.
STAT_REPLAYED = "replayed_tokens"
STAT_BROKEN = "replay_failed"


def replays(request: Any) -> bool:
    """Whether a mitigated request has a member whose decode steps carry state (memoised)."""
    memo = request.__dict__.get("_halluguard_replays")
    if memo is None:
        from vllm_halluguard.engine.keys import config_of
        from vllm_halluguard.engine.registry import member_methods

        cfg = config_of(request)
        memo = cfg is not None and any(m.replays_decode for m in member_methods(cfg))
        request.__dict__["_halluguard_replays"] = memo
    return memo


def replay_tokens(prompt_len: int, num_tokens: int, computed: int, num_new: int) -> int:
    """How many of ``num_new`` tokens from position ``computed`` to schedule for a request of
    ``num_tokens`` known tokens (prompt and generated) whose decode steps must be replayed.

    A chunk stops at the prompt's end; a generated token that is not the last known one goes alone.
    A request on its first prefill (``num_tokens == prompt_len``) or decoding (``computed >=
    num_tokens - 1``) is untouched.
    """
    if computed < prompt_len:
        return min(num_new, prompt_len - computed)
    if computed < num_tokens - 1:
        return min(num_new, 1)
    return num_new


def breaks_replay(prompt_len: int, num_tokens: int, computed: int, num_new: int) -> bool:
    """Whether computing ``num_new`` tokens from ``computed`` in one step skips a replayed decode step."""
    return num_new > replay_tokens(prompt_len, num_tokens, computed, num_new)


def _count(scheduler: Any, key: str) -> None:
    from vllm_halluguard.engine.two_pass import STATS_KEY

    stats = scheduler.__dict__.setdefault(STATS_KEY, {})
    stats[key] = stats.get(key, 0) + 1


def cache_hit_limit(prompt_len: int, block_size: int) -> int:
    """The most prefix-cache tokens a replaying request may read: whole blocks before its prompt's last
    token (what its first admission could read)."""
    return (prompt_len - 1) // block_size * block_size


@functools.cache
def install() -> None:
    """Patch vLLM's ``Scheduler`` (engine-core process): the cache-hit limit, the replay chunks and the
    check after scheduling."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_halluguard.engine import two_pass

    local_hit = Scheduler._get_local_prefix_cache_hit
    lookahead = Scheduler._reserve_prefill_lookahead
    schedule = Scheduler.schedule

    @functools.wraps(local_hit)
    def _get_local_prefix_cache_hit(self: Any, request: Any) -> Any:
        blocks, num_local, boundary, *rest = local_hit(self, request)
        if num_local and replays(request):
            limit = cache_hit_limit(request.num_prompt_tokens, self.block_size)
            if num_local > limit:
                blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, limit)
                num_local, boundary = limit, min(boundary, limit)
        return (blocks, num_local, boundary, *rest)

    @functools.wraps(lookahead)
    def _reserve_prefill_lookahead(self: Any, request: Any, computed: int, num_new: int) -> int:
        # vLLM calls this last before allocating a step's slots, for running and waiting requests alike
        num_new = lookahead(self, request, computed, num_new)
        if num_new > 1 and request.num_tokens > request.num_prompt_tokens and replays(request):
            return replay_tokens(request.num_prompt_tokens, request.num_tokens, computed, num_new)
        return num_new

    @functools.wraps(schedule)
    def _schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = schedule(self, *args, **kwargs)
        for req_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or not replays(request):
                continue
            # num_computed_tokens already counts this step's tokens (vLLM's _update_after_schedule)
            computed, prompt_len = request.num_computed_tokens - n, request.num_prompt_tokens
            if breaks_replay(prompt_len, request.num_tokens, computed, n):
                logger.error(
                    "halluguard: request %s would recompute %d tokens past its prompt in one step after a "
                    "preemption, which its method cannot reproduce; failing it",
                    req_id,
                    n,
                )
                _count(self, STAT_BROKEN)
                self.__dict__.setdefault(two_pass.FAILED_KEY, set()).add(req_id)
            elif prompt_len <= computed < request.num_tokens - 1:
                _count(self, STAT_REPLAYED)
        return output

    Scheduler._get_local_prefix_cache_hit = _get_local_prefix_cache_hit
    Scheduler._reserve_prefill_lookahead = _reserve_prefill_lookahead
    Scheduler.schedule = _schedule
