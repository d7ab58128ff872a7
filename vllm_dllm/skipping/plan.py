"""What one request's token skipping does in one pass, decided on the host."""

from dataclasses import dataclass, field

from vllm_dllm.skipping import dyllm, es


@dataclass
class RequestSkip:
    """What one request's skipping does in this pass (host values)."""

    method: str = "none"
    # False on full iterations: every row computed, caches refilled.
    sparse: bool = False
    # ES: rows kept after each layer where the keep fraction drops (sparse only),
    # and the layers whose hidden states it caches.
    es_counts: dict[int, int] = field(default_factory=dict)
    es_layers: tuple[int, ...] = ()
    es_alpha: float = es.DEFAULT_ALPHA
    dyllm_threshold: float = dyllm.DEFAULT_THRESHOLD
