"""RouterConfig: everything needed to rebuild the routers, saved next to their weights (peft-style)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ArtifactMismatch
from ..fsutil import read_artifact

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "routers.safetensors"
TARGETS = ("attn", "mlp", "block")
GRANULARITIES = ("sequence", "token")


def default_routed_layers(num_layers: int) -> list[int]:
    """The paper's placement: the upper half of the layers, never the last one."""
    return list(range(num_layers // 2, num_layers - 1))


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """``"16-27"``, ``"16,18,20"``, ``"16-20,24"`` or a list; ``None`` gives the default placement."""
    if spec is None or spec == "":
        return default_routed_layers(num_layers)
    if isinstance(spec, str):
        out: list[int] = []
        try:
            for part in spec.split(","):
                part = part.strip()
                if "-" in part:
                    a, b = part.split("-", 1)
                    out.extend(range(int(a), int(b) + 1))
                elif part:
                    out.append(int(part))
        except ValueError:
            raise ArtifactMismatch(f"layers must look like 16-27, 16,18,20 or 16-20,24; got {spec!r}") from None
    else:
        out = [int(x) for x in spec]
    out = sorted(set(out))
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ArtifactMismatch(f"layers {bad} out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    return out


@dataclass
class RouterConfig:
    base_model: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    target: str = "attn"
    granularity: str = "sequence"
    layers: list[int] = field(default_factory=list)
    threshold: float = 0.5
    base_revision: str | None = None
    base_gguf_file: str | None = None
    target_skip: float | None = None
    training: dict[str, Any] = field(default_factory=dict)
    execution_rates: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = 1

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ArtifactMismatch(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.granularity not in GRANULARITIES:
            raise ArtifactMismatch(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RouterConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, directory: str | Path) -> Path:
        from ..fsutil import write_json_atomic

        return write_json_atomic(Path(directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> "RouterConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ArtifactMismatch(f"{directory} holds no {CONFIG_NAME}: not a router folder")
        return cls.from_dict(read_artifact(path, what="router config"))

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise ArtifactMismatch(
                f"these routers were tuned for {self.base_model} (config fingerprint {self.fingerprint}), "
                f"not for this model (fingerprint {fingerprint})"
            )
