"""The precise prefix index on events shaped as vLLM sends them: keys from token ids, not from engine hashes."""

from __future__ import annotations

import random

from gateway.fleet.kv_protocol import AllBlocksCleared, BlockRemoved, BlockStored
from gateway.routing.block_keys import token_block_keys
from gateway.routing.kv_index import CacheState, KvIndex

BS = 16
A, B = "http://a:8000", "http://b:8000"


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def stored(
    ids: list[int], hashes: list[int], parent: int | None = None, lora: str | None = None, **extra: object
) -> BlockStored:
    extra_keys = [(lora,) if lora else None for _ in hashes]
    return BlockStored(
        block_hashes=hashes, parent_block_hash=parent, token_ids=ids, block_size=BS, lora_name=lora,
        medium="GPU", extra_keys=extra_keys, group_idx=0, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def live_index() -> KvIndex:
    index = KvIndex(max_blocks_per_backend=1000)
    for url in (A, B):
        index.synced(url, 0)
    return index


def test_a_request_finds_the_blocks_an_engine_stored_whatever_its_hashes() -> None:
    prompt = tokens(5 * BS + 3)
    index = live_index()
    # Two engines announce the same blocks under unrelated hashes (other seeds, other hash functions):
    # the first in one event, the second in two, the later one chained through its parent's engine hash.
    index.apply(A, 0, [stored(prompt[: 4 * BS], [11, 12, 13, 14])])
    index.apply(B, 0, [stored(prompt[: 2 * BS], [901, 902]), stored(prompt[2 * BS : 5 * BS], [903, 904, 905], 902)])
    keys = token_block_keys(prompt, BS, None)
    assert len(keys) == 5
    assert index.match(keys, [A, B, "http://c:8000"]) == [4, 5, 0]
    assert index.state(A) is CacheState.LIVE
    assert index.block_size([A]) == BS
    other = token_block_keys([*prompt[:BS], *tokens(4 * BS, seed=1)], BS, None)
    assert index.match(other, [A, B]) == [1, 1]  # only the first block is shared


def test_removed_blocks_end_the_match_and_a_clear_empties_the_engine() -> None:
    prompt = tokens(4 * BS)
    index = live_index()
    index.apply(A, 0, [stored(prompt, [1, 2, 3, 4])])
    index.apply(A, 0, [BlockRemoved(block_hashes=[3], medium="GPU")])
    keys = token_block_keys(prompt, BS, None)
    assert index.match(keys, [A]) == [2]
    index.apply(A, 0, [AllBlocksCleared()])
    assert index.match(keys, [A]) == [0]
    assert index.backend(A).blocks == 0
    assert index.state(A) is CacheState.LIVE  # a cleared cache is known: empty


def test_adapters_never_share_blocks_with_the_base_model() -> None:
    prompt = tokens(2 * BS)
    index = live_index()
    index.apply(A, 0, [stored(prompt, [1, 2], lora="lora-a")])
    assert index.match(token_block_keys(prompt, BS, None), [A]) == [0]
    assert index.match(token_block_keys(prompt, BS, "lora-a"), [A]) == [2]


def test_blocks_it_cannot_key_are_skipped_with_their_descendants() -> None:
    prompt = tokens(3 * BS)
    index = live_index()
    image = BlockStored(
        block_hashes=[1, 2, 3], parent_block_hash=None, token_ids=prompt, block_size=BS, lora_name=None,
        extra_keys=[None, (("mm", "img-1", 0),), None],
    )  # fmt: skip
    index.apply(A, 0, [image, stored(tokens(BS, seed=2), [4], parent=999)])  # an unknown parent
    assert index.match(token_block_keys(prompt, BS, None), [A]) == [1]
    assert index.backend(A).skipped == 3


def test_a_reuse_report_is_not_counted_twice() -> None:
    prompt = tokens(2 * BS)
    index = live_index()
    index.apply(A, 0, [stored(prompt, [1, 2]), stored(prompt, [1, 2])])  # kv_cache_report_mode "full"
    index.apply(A, 0, [BlockRemoved(block_hashes=[1, 2], medium="GPU")])
    assert index.backend(A).blocks == 0


def test_lost_events_drop_what_was_known_and_rebuild_until_a_cache_has_turned_over() -> None:
    prompt = tokens(4 * BS)
    keys = token_block_keys(prompt, BS, None)
    index = live_index()
    index.set_capacity(A, 6)
    index.apply(A, 0, [stored(prompt, [1, 2, 3, 4])])
    index.lost(A)
    assert index.state(A) is CacheState.REBUILDING
    assert index.match(keys, [A]) == [0]  # never stale truth
    index.apply(A, 0, [stored(prompt, [5, 6, 7, 8])])
    assert index.match(keys, [A]) == [4]  # what it stores again is known...
    assert index.state(A) is CacheState.REBUILDING  # ...but not what it may still hold from before
    index.apply(A, 0, [stored(tokens(2 * BS, seed=3), [9, 10])])
    assert index.state(A) is CacheState.LIVE  # a cache's worth of stores since the loss


def test_a_restart_forgets_the_old_engine_and_more_blocks_than_possible_mean_a_rebuild() -> None:
    index = KvIndex(max_blocks_per_backend=3)
    index.synced(A, 0)
    index.apply(A, 0, [stored(tokens(2 * BS), [1, 2])])
    index.restarted(A, 0)
    assert index.backend(A).blocks == 0
    index.apply(A, 0, [stored(tokens(4 * BS, seed=5), [3, 4, 5, 6])])  # removals must have been missed
    assert index.state(A) is CacheState.REBUILDING
    assert index.backend(A).blocks == 0


def test_a_whole_history_read_after_a_loss_or_a_restart_makes_the_cache_known_again() -> None:
    """After a loss, an engine restart whose history is read from its first batch (the follower's replay from
    0) leaves nothing unknown: the backend is live again, not rebuilding until a cache's worth of stores."""
    index = KvIndex(max_blocks_per_backend=1000)
    index.synced(A, 0)
    index.lost(A)
    index.restarted(A, 0)
    assert index.state(A) is CacheState.REBUILDING
    index.synced(A, 0)
    assert index.state(A) is CacheState.LIVE
    # with two data-parallel ranks, both histories must be whole again
    index.synced(B, 0)
    index.synced(B, 1)
    index.lost(B)
    index.synced(B, 0)
    assert index.state(B) is CacheState.REBUILDING
    index.synced(B, 1)
    assert index.state(B) is CacheState.LIVE


def test_a_backend_is_live_only_once_every_rank_it_publishes_from_has_synced() -> None:
    """Data-parallel ranks sync one by one: the first to catch up does not make the whole cache known."""
    index = KvIndex(max_blocks_per_backend=1000)
    index.expect(A, [0, 1])
    index.synced(A, 0)
    assert index.state(A) is CacheState.UNKNOWN
    index.synced(A, 1)
    assert index.state(A) is CacheState.LIVE


def test_unknown_and_forgotten_backends() -> None:
    prompt = tokens(2 * BS)
    index = live_index()
    index.apply(A, 0, [stored(prompt, [1, 2])])
    index.unknown(A)
    assert index.state(A) is CacheState.UNKNOWN
    assert index.match(token_block_keys(prompt, BS, None), [A]) == [0]
    index.forget(A)
    assert index.state(A) is CacheState.UNKNOWN
    assert [entry.url for entry in index.snapshot()] == [B]


def test_blocks_routed_to_a_backend_count_until_its_events_confirm_them_or_they_settle_out() -> None:
    from gateway.routing.kv_index import SETTLE_SECONDS

    index = live_index()
    prompt = tokens(4 * BS, seed=3)
    keys = token_block_keys(prompt, BS, None)
    index.routed(A, keys)
    index.routed(A, keys[:2])  # a second request sharing the first two blocks
    assert index.match(keys, [A, B]) == [0, 0]  # announced: nothing yet
    assert index.match_routed(keys, [A, B], now=0.0) == [4, 0]
    index.settled(A, keys, now=10.0)  # the first request's prefill is over; no event yet
    assert index.match_routed(keys, [A, B], now=10.0 + SETTLE_SECONDS / 2) == [4, 0]
    assert index.match_routed(keys, [A, B], now=10.0 + SETTLE_SECONDS) == [2, 0]  # the second is still in prefill
    index.apply(A, 0, [stored(prompt[: 2 * BS], [1, 2])])  # confirmed by the engine
    index.settled(A, keys[:2], now=11.0)
    index.apply(A, 0, [BlockRemoved(block_hashes=[2], medium="GPU")])
    assert index.match_routed(keys, [A, B], now=11.0) == [1, 0]  # the engine's word stands once it has spoken
    index.routed(B, keys)
    index.forget(B)
    assert index.match_routed(keys, [A, B], now=11.0) == [1, 0]


def test_blocks_routed_and_settled_with_no_event_are_forgotten_after_the_settle_time() -> None:
    from gateway.routing.kv_index import SETTLE_SECONDS

    index = live_index()
    keys = token_block_keys(tokens(3 * BS, seed=4), BS, None)
    index.routed(B, keys)
    index.settled(B, keys, now=5.0)  # the attempt failed, or the blocks were already held: no event comes
    assert index.match_routed(keys, [A, B], now=5.0) == [0, 3]
    assert index.match_routed(keys, [A, B], now=5.0 + SETTLE_SECONDS + 0.01) == [0, 0]
    index.settled(B, keys, now=7.0)  # a late, repeated settle changes nothing
    assert index.match_routed(keys, [A, B], now=7.0) == [0, 0]
