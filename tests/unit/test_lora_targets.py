"""The LoRA target names the API accepts (static, in the catalog) are the ones peft accepts on the real
networks: each backbone is built (random weights) and every module name is tried with peft, through the
recipe's own `apply_lora`, and a forward pass."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from torch import nn

from graft.catalog import BUILTIN_MODELS, LORA_TARGET_MODULES
from ml.methods import apply_lora
from ml.networks import (
    CnnSmallBackbone,
    EfficientNetLite0Backbone,
    MiniLMBackbone,
    TransferModel,
)

# The layer types peft's LoRA dispatches on (peft/tuners/lora/layer.py, dispatch_default): only modules of
# these types are worth trying by their full path when their leaf name is refused.
LORA_LAYER_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _minilm() -> tuple[nn.Module, Any]:
    tokens = torch.randint(0, 1000, (2, 7))
    return MiniLMBackbone(), {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}


def _efficientnet() -> tuple[nn.Module, Any]:
    return EfficientNetLite0Backbone(), torch.randn(2, 3, 64, 64)


def _cnn_small() -> tuple[nn.Module, Any]:
    return CnnSmallBackbone(), torch.randn(2, 3, 32, 32)


NETWORKS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "minilm-l6": _minilm,
    "efficientnet-lite0": _efficientnet,
    "cnn-small": _cnn_small,
}


def peft_accepts(model: TransferModel, target: str, inputs: Any) -> bool:
    """Whether the recipe's LoRA setup takes `target` and the adapted network still runs."""
    trial = copy.deepcopy(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_lora(trial, {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": [target]})
            with torch.no_grad():
                trial(inputs)
    # peft refuses a module type with ValueError; a convolution it wraps but cannot follow (its own
    # "same" padding) fails in the forward pass with a shape error or peft's own assertion.
    except (ValueError, RuntimeError, AssertionError):
        return False
    return True


def accepted_names(backbone: nn.Module, inputs: Any) -> set[str]:
    """Leaf module names peft accepts, and the paths (within the backbone) of the adaptable modules whose
    leaf name it refuses (it matches other, unadaptable modules too)."""
    model = TransferModel(backbone, num_classes=3).eval()
    modules = [(name, module) for name, module in backbone.named_modules() if name]
    leaves = {name.rsplit(".", 1)[-1] for name, _ in modules}
    accepted = {leaf for leaf in sorted(leaves) if peft_accepts(model, leaf, inputs)}
    for name, module in modules:
        leaf = name.rsplit(".", 1)[-1]
        if (
            leaf not in accepted
            and isinstance(module, LORA_LAYER_TYPES)
            and peft_accepts(model, name, inputs)
        ):
            accepted.add(name)
    return accepted


@pytest.mark.parametrize("architecture", sorted(NETWORKS))
def test_the_static_names_are_what_peft_accepts_on_the_network(architecture: str) -> None:
    torch.manual_seed(0)
    backbone, inputs = NETWORKS[architecture]()
    assert set(LORA_TARGET_MODULES[architecture]) == accepted_names(backbone, inputs)


@pytest.mark.parametrize("architecture", sorted(NETWORKS))
def test_the_backbones_own_targets_are_among_the_static_names(architecture: str) -> None:
    """What a job gets when it names no targets is what the API would accept if it named them."""
    backbone, _ = NETWORKS[architecture]()
    default = cast("list[str] | str", backbone.lora_targets)
    names = set(LORA_TARGET_MODULES[architecture])
    if isinstance(default, str):  # a regular expression, which peft matches against the full name
        model = TransferModel(backbone, num_classes=3)
        matched = {name for name, _ in model.named_modules() if re.fullmatch(default, name)}
        assert {name.removeprefix("backbone.") for name in matched} == names
    else:
        assert set(default) <= names


def test_every_architecture_offering_lora_has_names_and_no_other_does() -> None:
    for model in BUILTIN_MODELS.values():
        offers = "lora" in model.architecture_methods
        assert offers == bool(LORA_TARGET_MODULES.get(model.id)), model.id
    assert set(LORA_TARGET_MODULES) <= set(BUILTIN_MODELS)


@pytest.mark.parametrize(
    ("architecture", "small"),
    [("minilm-l6", lambda: MiniLMBackbone(num_layers=2)), ("cnn-small", lambda: CnnSmallBackbone(width=8))],
)
def test_the_names_hold_for_the_architectures_smaller_networks(
    architecture: str, small: Callable[[], nn.Module]
) -> None:
    """A shallower or narrower network of the architecture (a distilled student, fine-tuned later) is
    checked against the same names: each still matches modules (as peft matches), all of adaptable types."""
    modules = list(small().named_modules())
    for target in LORA_TARGET_MODULES[architecture]:
        matched = [m for name, m in modules if name == target or name.endswith(f".{target}")]
        assert matched, target
        assert all(isinstance(m, LORA_LAYER_TYPES) for m in matched), target
