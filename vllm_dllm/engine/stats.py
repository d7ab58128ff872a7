"""dLLM counters gathered by the scheduler and carried to the front end's stat loggers.

Per engine-step interval the scheduler counts, for every request iteration it ran,
the tokens the iteration committed and the rows it recomputed; for every request
that left the engine, how many iterations it ran; and, when the stats are taken,
how many running requests are at each block of their canvas.

The engine core sends `SchedulerStats` to the front end as that declared type,
so fields of a subclass would be dropped on the way. The counters therefore
travel as a `dict[str, int]` in `SchedulerStats.running_lora_adapters`, which
vLLM only reads with LoRA enabled, and LLaDA has no LoRA support. Every key is
namespaced ("dllm:<series>:<value>" -> how many times that value was seen, plus
"dllm:" itself, so that stats with nothing in them still reset the gauge).
"""

from collections import Counter
from dataclasses import dataclass, field

PREFIX = "dllm:"
SERIES = ("committed", "rows", "request_iterations", "block")


@dataclass
class DllmStats:
    # value -> number of observations, per series.
    committed: Counter = field(default_factory=Counter)  # tokens committed per iteration
    rows: Counter = field(default_factory=Counter)  # rows recomputed per iteration
    request_iterations: Counter = field(default_factory=Counter)  # per finished request
    block: Counter = field(default_factory=Counter)  # running requests per block (a gauge)

    def observe_iteration(self, committed: int, rows: int) -> None:
        self.committed[committed] += 1
        self.rows[rows] += 1

    @property
    def iterations(self) -> int:
        return sum(self.committed.values())

    def to_wire(self) -> dict[str, int]:
        wire = {PREFIX: 1}
        for name in SERIES:
            wire.update((f"{PREFIX}{name}:{value}", count)
                        for value, count in getattr(self, name).items())
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, int]) -> "DllmStats | None":
        """The stats in `wire`, or None if it carries none (another model's dict)."""
        if PREFIX not in wire:
            return None
        stats = cls()
        for key, count in wire.items():
            name, _, value = key[len(PREFIX):].partition(":")
            if key.startswith(PREFIX) and name in SERIES:
                getattr(stats, name)[int(value)] += count
        return stats
