"""Starting a run from a model directory (``train.init_from``): `coca init` output, a finished
run's ``model/`` or a run's ``best/``. The architecture was already taken from its config.json
(``config.init_model_config``); here the weights are loaded, strictly or partially."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputNotFound, UserError
from ..models.coca import TOKENIZER_FILE, WEIGHTS_FILE, load_checked, unique_state


@dataclass
class InitReport:
    source: str
    loaded: int                                   # tensors copied from the directory
    missing: list[str] = field(default_factory=list)     # model tensors the directory lacks (kept as initialised)
    unexpected: list[str] = field(default_factory=list)  # directory tensors the model has no place for (ignored)

    def lines(self) -> list[str]:
        out = [f"initialised {self.loaded} tensors from {self.source}"]
        out += [f"  missing (fresh initialisation): {name}" for name in self.missing]
        out += [f"  unexpected (ignored): {name}" for name in self.unexpected]
        return out


def load_init_weights(model, init_dir: str | Path, strict: bool = True) -> InitReport:
    """Copy the weights of ``init_dir`` into ``model``. Strict: every tensor must be there with its
    shape. Not strict: tensors the directory lacks keep their initialisation and tensors the model
    lacks are ignored, both listed in the report; a tensor with another shape is still an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(init_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise InputNotFound(f"train.init_from: {path} is missing (a model directory holds {WEIGHTS_FILE})")
    device = next(model.parameters()).device
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None
    expected = unique_state(model)
    report = InitReport(str(path), 0, [n for n in expected if n not in state], [n for n in state if n not in expected])
    if strict:
        try:
            load_checked(model, state, str(path))  # names missing / unexpected / misshapen tensors
        except ValueError as e:
            hint = "; set train.init_strict=false to load what matches" if report.missing or report.unexpected else ""
            raise UserError(f"train.init_from: {e}{hint}") from None
    else:
        try:
            load_checked(model, {k: v for k, v in state.items() if k in expected}, str(path), allow_missing=True)
        except ValueError as e:
            raise UserError(f"train.init_from: {e}") from None
    report.loaded = sum(k in expected for k in state)
    return report


def init_tokenizer(init_dir: str | Path) -> Path:
    """The tokenizer a run from ``init_dir`` uses when ``data.tokenizer`` names none."""
    path = Path(init_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise InputNotFound(f"train.init_from: {path} is missing; its text weights belong to a tokenizer: "
                                "set data.tokenizer=PATH to the tokenizer.model they were trained with")
    return path
