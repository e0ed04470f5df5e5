"""The inductive transfer methods: which weights train, and at what learning rate.

- `linear_probe`: the backbone is frozen; only the new head trains (on cached features), and the feature
  adapter over them when the model has one.
- `partial`: the last `unfreeze_blocks` blocks of the backbone and the head train; lower blocks stay
  frozen. With `layer_lr_decay` d, the head trains at the learning rate and the k-th block from the
  top at lr * d^k (discriminative learning rates).
- `full`: everything trains (`layer_lr_decay` applies the same way; 1.0 means one learning rate).
- `lora`: low-rank adapters (peft) on the backbone's target modules; the backbone's own weights stay
  frozen; the head trains. The adapter can be saved alone or merged into the weights.

Batch-norm layers whose weights are frozen also keep their running statistics (eval mode), so a frozen
part of a network computes exactly what it computed before transfer; with `freeze_batch_norm` (the
default when fine-tuning learned weights) every batch norm keeps them while its scale and shift train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ml.networks import TransferModel

LORA_METADATA_KEY = "graft_lora"
# A feature adapter trained beside a head moves at this fraction of the head's rate. Measured on the text
# domain shift of bench/quality.py (film reviews -> product reviews, MiniLM frozen, one seed; target
# accuracy of source_only / mmd / coral): at the head's own 1e-2 0.725 / 0.715 / 0.688, at 0.1x 0.648 /
# 0.757 / 0.755, at 0.03x 0.724 / 0.771 / 0.761, at 0.01x 0.721 / 0.752 / 0.752.
ADAPTER_LR_FACTOR = 0.03


@dataclass
class MethodSetup:
    param_groups: list[dict[str, Any]]
    lora: dict[str, Any] | None = None
    peft_model: Any = None
    trainable_names: list[str] = field(default_factory=list)


def backbone_blocks(model: TransferModel) -> list[nn.Module]:
    blocks = getattr(model.backbone, "blocks", None)
    return list(blocks()) if callable(blocks) else []


def _decayed_groups(
    model: TransferModel, lr: float, decay: float, blocks: list[nn.Module]
) -> list[dict[str, Any]]:
    """Head at lr; the k-th block from the top at lr * decay^(k+1); the rest below at the lowest rate."""
    assigned: dict[int, float] = {}
    if model.head is not None:
        for p in model.head.parameters():
            assigned[id(p)] = lr
    for depth, block in enumerate(reversed(blocks)):
        for p in block.parameters():
            assigned.setdefault(id(p), lr * decay ** (depth + 1))
    lowest = lr * decay ** (len(blocks) + 1)
    groups: dict[float, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(assigned.get(id(p), lowest), []).append(p)
    return [{"params": params, "lr": rate} for rate, params in sorted(groups.items(), reverse=True)]


def lora_config(model: TransferModel, hp: dict[str, Any]) -> dict[str, Any]:
    targets = hp.get("lora_target_modules") or getattr(model.backbone, "lora_targets", None)
    if not targets:
        raise ValueError("this architecture has no LoRA target modules; name them in lora_target_modules")
    return {
        "r": int(hp["lora_rank"]),
        "lora_alpha": float(hp["lora_alpha"]),
        "lora_dropout": float(hp["lora_dropout"]),
        "target_modules": targets,
    }


def apply_lora(model: TransferModel, config: dict[str, Any]) -> Any:
    """Inject adapters into `model` in place (its head stays trainable) and return the peft wrapper."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**config))
    if model.head is not None:
        for p in model.head.parameters():
            p.requires_grad_(True)
    return peft_model


def configure(model: TransferModel, method: str, hp: dict[str, Any]) -> MethodSetup:
    lr = float(hp["learning_rate"])
    blocks = backbone_blocks(model)
    if method == "linear_probe":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        assert model.head is not None
        groups = [{"params": list(model.head.parameters()), "lr": lr}]
        if model.adapter is not None:  # a feature adapter trains with the head, at a tenth of its rate
            groups.append({"params": list(model.adapter.parameters()), "lr": lr * ADAPTER_LR_FACTOR})
        setup = MethodSetup(param_groups=groups)
    elif method == "partial":
        count = int(hp["unfreeze_blocks"])
        if count > len(blocks):
            raise ValueError(f"unfreeze_blocks is {count} but this backbone has {len(blocks)} blocks")
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        unfrozen = blocks[len(blocks) - count :] if count else []
        for block in unfrozen:
            for p in block.parameters():
                p.requires_grad_(True)
        setup = MethodSetup(_decayed_groups(model, lr, float(hp["layer_lr_decay"]), unfrozen))
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        setup = MethodSetup(_decayed_groups(model, lr, float(hp.get("layer_lr_decay", 1.0)), blocks))
    elif method == "lora":
        config = lora_config(model, hp)
        peft_model = apply_lora(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        setup = MethodSetup([{"params": params, "lr": lr}], lora=config, peft_model=peft_model)
    else:
        raise ValueError(f"unknown method {method!r}")
    setup.trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
    return setup


def freeze_norm_statistics(model: nn.Module, *, all_norms: bool) -> None:
    """Call after model.train(): batch norms keep their running statistics (eval mode) when their weights
    are frozen, or all of them with `all_norms` (fine-tuning learned weights on small batches, where new
    statistics would drift from the ones the weights were learned with)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            all_norms or (module.weight is not None and not module.weight.requires_grad)
        ):
            module.eval()


def trained_tensors(model: TransferModel, method: str) -> dict[str, Tensor]:
    """What a checkpoint holds: the tensors the method changes. Buffers (batch-norm statistics) move with
    the blocks that train."""
    state = model.state_dict()
    if method == "full":
        return state
    if method == "lora":
        return {k: v for k, v in state.items() if ".lora_" in k or k.startswith("head.")}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    modules = {name.rsplit(".", 1)[0] for name in trainable}
    return {k: v for k, v in state.items() if k in trainable or k.rsplit(".", 1)[0] in modules}


def lora_metadata(config: dict[str, Any]) -> dict[str, str]:
    return {LORA_METADATA_KEY: json.dumps(config, sort_keys=True)}


def merge_lora(peft_model: Any) -> TransferModel:
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, TransferModel)
    return merged


def adapter_tensors(peft_model: Any, model: TransferModel) -> dict[str, Tensor]:
    """The adapter on its own (peft's names) and the head it was trained with."""
    from peft import get_peft_model_state_dict

    tensors = dict(get_peft_model_state_dict(peft_model))
    if model.head is not None:
        tensors.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    return tensors


def apply_checkpoint(
    model: TransferModel, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> TransferModel:
    """Put a checkpoint's tensors on a model built from the same base; LoRA checkpoints are merged in."""
    lora = metadata.get(LORA_METADATA_KEY)
    if lora:
        peft_model = apply_lora(model, json.loads(lora))
        missing = set(tensors) - set(model.state_dict())
        if missing:
            raise ValueError(f"checkpoint tensor '{sorted(missing)[0]}' does not fit the model")
        model.load_state_dict(tensors, strict=False)
        return merge_lora(peft_model)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint tensor '{result.unexpected_keys[0]}' does not fit the model")
    return model
