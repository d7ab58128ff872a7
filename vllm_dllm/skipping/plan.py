"""What one request's token skipping does in one pass, decided on the host."""

from dataclasses import dataclass, field

from vllm_dllm.params import DllmParams


@dataclass(frozen=True)
class RequestSkip:
    """One request's skipping in this pass: its parameters, whether this pass is
    sparse (False: every row computed, caches refilled) and, for ES, the rows kept
    after each layer where the keep fraction drops and the layers whose hidden
    states it caches."""

    params: DllmParams
    sparse: bool = False
    es_counts: dict[int, int] = field(default_factory=dict)
    es_layers: tuple[int, ...] = ()

    @property
    def method(self) -> str:
        return self.params.skip
