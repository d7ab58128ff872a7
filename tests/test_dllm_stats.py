"""The dLLM counters' trip from the scheduler to the front end (engine/stats.py)."""

from collections import Counter

from vllm_dllm.engine.stats import DllmStats


def test_stats_survive_the_wire_and_foreign_dicts_are_not_stats():
    stats = DllmStats()
    for committed, rows in ((1, 40), (1, 40), (4, 8)):
        stats.observe_iteration(committed, rows)
    stats.request_iterations[3] += 1
    stats.block.update([0, 0, 2])
    back = DllmStats.from_wire(stats.to_wire())
    assert back == stats and back.iterations == 3
    # Nothing running, nothing done: still stats (they reset the block gauge).
    assert DllmStats.from_wire(DllmStats().to_wire()) == DllmStats()
    # What the field holds for another model: LoRA adapter names.
    assert DllmStats.from_wire({"my-adapter": 2}) is None
    assert back.block == Counter({0: 2, 2: 1})
