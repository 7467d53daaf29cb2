"""The pieces of a checkpoint as DCP ``Stateful`` objects: model, optimizer, small Python
state as JSON (nothing in a checkpoint is unpickled: safe_dcp.py), RNG, and the loop's step."""

import json
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torchmoe.train.split_experts import SplitLoad


class ModelOnly:
    """Stateful view of the model's weights (a seed). While ``split`` is set, the state dict
    describes a checkpoint that stores the experts' gate and up apart (split_experts.py)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.split: SplitLoad | None = None

    def state_dict(self) -> dict:
        return self._split({"model": get_model_state_dict(self.model)})

    def load_state_dict(self, sd: dict) -> None:
        set_model_state_dict(self.model, self._joined(sd)["model"])

    def _split(self, sd: dict) -> dict:
        return sd if self.split is None else self.split.split(sd)

    def _joined(self, sd: dict) -> dict:
        return sd if self.split is None else self.split.join(sd)


class ModelAndOptimizer(ModelOnly):
    """Stateful view of model + optimizer, keyed by fully qualified parameter names. The
    optimizer's hyperparameters are flattened per parameter too: pipeline stages each hold
    some of the parameters, and one rank's param_groups would not describe the others'.
    ``flat = False`` reads checkpoints written before that (param_groups by position)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(model)
        self.optimizer = optimizer
        self.flat = True

    def _options(self) -> StateDictOptions:
        return StateDictOptions(flatten_optimizer_state_dict=self.flat)

    def state_dict(self) -> dict:
        return self._split(
            {
                "model": get_model_state_dict(self.model),
                "optimizer": get_optimizer_state_dict(
                    self.model, self.optimizer, options=self._options()
                ),
            }
        )

    def load_state_dict(self, sd: dict) -> None:
        sd = self._joined(sd)
        set_model_state_dict(self.model, sd["model"])
        set_optimizer_state_dict(
            self.model, self.optimizer, sd["optimizer"], options=self._options()
        )


class JSONState:
    """Stateful holder for small Python state (data position, step) saved as JSON blobs, since
    its shape (e.g. a token buffer's length) is not known before loading, and JSON so that
    loading it runs nothing (safe_dcp.py). With ``key`` the state is one blob; without, each
    top-level entry of the state is a blob of its own (the data position: one per stream, so a
    rank of another layout loads the streams it now owns). Equal keys on several ranks are
    saved once."""

    def __init__(self, obj: Any, what: str, key: str | None = "blob"):
        self.obj, self.what, self.key = obj, what, key

    def state_dict(self) -> dict:
        state = self.obj.state_dict()
        if self.key is not None:
            state = {self.key: state}
        return {k: json.dumps(v).encode() for k, v in state.items()}

    def load_state_dict(self, sd: dict) -> None:
        try:
            state = {k: json.loads(v) for k, v in sd.items()}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise OldPickledState(self.what) from None
        self.obj.load_state_dict(state if self.key is None else state[self.key])


class OldPickledState(Exception):
    """A checkpoint from before the JSON format keeps this state pickled: never unpickled."""


class RNG:
    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_initialized():  # a CPU run never touches CUDA (nor may forked ranks)
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, sd: dict) -> None:
        torch.set_rng_state(sd["cpu"])
        if "cuda" in sd:
            torch.cuda.set_rng_state(sd["cuda"])


class TrainState:
    """The loop's own counters."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        self.step = sd["step"]
