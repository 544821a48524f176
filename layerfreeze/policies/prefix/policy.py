"""The ``prefix`` policy: its options and the layer-level check / apply of both forms.

``form=branch`` (:mod:`~layerfreeze.policies.prefix.branch`) and ``form=paper``
(:mod:`~layerfreeze.policies.prefix.paper`) share the adapter class, the gate and the way into
the attention call (:mod:`~layerfreeze.policies.prefix.attention`); other attention modules
(megatron-core) come through a registered ``PrefixInstaller``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from layerfreeze.errors import ConfigError
from layerfreeze.models import LayerInfo, ModelLayout
from layerfreeze.policies.base import PolicySpec
from layerfreeze.policies.prefix.attention import (
    ADAPTER_ATTR,
    attention_problems,
    find_installer,
    install_attention,
)
from layerfreeze.policies.prefix.branch import PrefixAdapter
from layerfreeze.policies.prefix.paper import configure_adapter, form_mismatch, paper_form_problems
from layerfreeze.registry import register_policy

__all__ = ["PrefixConfig", "PrefixPolicy"]


@dataclass(frozen=True)
class PrefixConfig:
    """Options of ``prefix``."""

    tokens: int = 10
    """Number of learned prefix (virtual) tokens per layer (>= 1)."""
    reparam: int | None = None
    """Hidden width of the prefix-tuning reparameterisation MLP (embedding -> Linear -> tanh ->
    Linear -> keys/values); null learns the keys/values directly."""
    gated: bool = False
    """Also scale the branch by the HLPT gate ``sigmoid(w . h + b)`` per token (h: attn input)."""
    lr_scale: float = 1.0
    """Multiplier on the run's learning rate for the prefix keys/values (or embedding and MLP)."""
    weight_decay: float | None = None
    """Weight decay for the prefix matrices (None: the run's default); biases and gates get none."""
    gate_lr_scale: float = 1.0
    """Multiplier on the run's learning rate for the zero-init factor and the gate (no decay)."""
    form: str = "branch"
    """``branch``: a separate zero-initialised attention branch over the prefix (identity at
    init); ``paper``: HLPT's form, the prefix prepended to the layer's own keys/values (one
    softmax), the gate scaling the prefix's attention weights (see ``prefix/paper.py``)."""
    gate_bias: float = 0.0
    """Initial bias ``b`` of the gate (``w = 0``): ``g = sigmoid(b)`` at init. With form=paper a
    very negative value (e.g. -30) starts the gate closed, i.e. the base model."""
    gate_at: str = "logit"
    """Where the gate acts in ``form=paper`` (with ``gated``): ``logit`` adds ``log g`` to the
    prefix's attention logits (scales their unnormalised attention weights; a closed gate is the
    base attention), ``value`` scales the prefix's value vectors by ``g`` inside the same softmax
    (the prefix keeps its attention mass). See docs/plans.md. The branch form reads no
    ``gate_at`` (its gate scales the branch output)."""

    def __post_init__(self):
        problems = []
        if self.form not in ("branch", "paper"):
            problems.append(f"form: must be branch or paper, got {self.form!r}.")
        if self.gate_at not in ("logit", "value"):
            problems.append(f"gate_at: must be logit or value, got {self.gate_at!r}.")
        elif self.gate_at == "value" and (self.form != "paper" or not self.gated):
            problems.append(
                f"gate_at: value is read by the gated paper form only, got form={self.form}, "
                f"gated={str(self.gated).lower()}. Add form=paper,gated or drop gate_at."
            )
        if isinstance(self.gate_bias, bool) or not isinstance(self.gate_bias, (int, float)):
            problems.append(f"gate_bias: must be a number, got {self.gate_bias!r}.")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            problems.append(
                f"tokens: must be an integer >= 1, got {self.tokens!r}. Use e.g. tokens=16."
            )
        if self.reparam is not None and (
            isinstance(self.reparam, bool) or not isinstance(self.reparam, int) or self.reparam < 1
        ):
            problems.append(
                f"reparam: must be a hidden width >= 1 or null, got {self.reparam!r}. "
                "Use e.g. reparam=512."
            )
        if not self.lr_scale > 0:
            problems.append(f"lr_scale: must be > 0, got {self.lr_scale!r}. Use e.g. lr_scale=1.0.")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay!r}.")
        if not self.gate_lr_scale > 0:
            problems.append(f"gate_lr_scale: must be > 0, got {self.gate_lr_scale!r}.")
        if problems:
            raise ConfigError(problems)


def _options(spec: PolicySpec) -> PrefixConfig:
    return spec.options if spec.options is not None else PrefixConfig()


def _attn_dims(attn: nn.Module, layout: ModelLayout) -> tuple[int, int]:
    """Per-head widths ``(query/key, value)``: the module's own (MLA's ``qk_head_dim`` /
    ``v_head_dim``, else ``head_dim``), falling back to the layout's."""
    qk = getattr(attn, "qk_head_dim", None)
    qk = qk if isinstance(qk, int) else getattr(attn, "head_dim", None)
    qk = qk if isinstance(qk, int) else layout.head_dim
    v = getattr(attn, "v_head_dim", None)
    return qk, (v if isinstance(v, int) else qk)


@register_policy("prefix")
class PrefixPolicy:
    """Zero-initialised prefix attention branch (optionally HLPT-gated) on a layer's attention."""

    config_cls = PrefixConfig
    param_prefix = "prefix_"

    def check(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> list[str]:
        """Problems that stop the branch from being added to ``layer``'s attention."""
        if _options(spec).form == "paper":
            return paper_form_problems(self, layer, spec, layout)
        if form_mismatch(layer, "branch"):
            return form_mismatch(layer, "branch")
        installer = find_installer(layer.attn)
        if installer is not None:
            return installer.check(layer, spec, layout)
        opts = _options(spec)
        attn = layer.attn
        where = f"layer {layer.index} ({layer.name}.{layer.attn_name}, {type(attn).__name__})"
        problems = []
        if getattr(attn, "is_cross_attention", False):
            problems.append(f"{where}: prefix supports self-attention only, not cross-attention.")
        if layout.num_kv_heads < 1 or layout.num_heads % layout.num_kv_heads:
            problems.append(
                f"{where}: {layout.num_heads} query heads are not a multiple of "
                f"{layout.num_kv_heads} key/value heads."
            )
        existing = attn._modules.get(ADAPTER_ATTR)
        if existing is not None and (existing.tokens, existing.reparam, existing.gated) != (
            opts.tokens, opts.reparam, opts.gated
        ):
            problems.append(
                f"{where}: already carries a prefix adapter ({existing.extra_repr()}, "
                f"gated={existing.gated}) that differs from {spec.describe()}; use the same "
                "prefix options in every plan that covers this layer."
            )
        return problems + attention_problems(attn, where)

    def apply(self, layer: LayerInfo, spec: PolicySpec, layout: ModelLayout) -> set[str]:
        """Install the adapter, hooks and wrapper implementation once; return the names."""
        problems = self.check(layer, spec, layout)
        if problems:
            raise ValueError("\n".join(problems))
        installer = find_installer(layer.attn)
        if installer is not None:
            adapter = installer.install(layer, spec, layout)
            return {f"{layer.attn_name}.{ADAPTER_ATTR}.{n}" for n, _ in adapter.named_parameters()}
        opts = _options(spec)
        attn = layer.attn
        adapter = attn._modules.get(ADAPTER_ATTR)
        if adapter is None:
            w = next(attn.parameters())
            head_dim, value_dim = _attn_dims(attn, layout)
            adapter = PrefixAdapter(
                layout.num_heads, layout.num_kv_heads, head_dim, layout.hidden_size,
                tokens=opts.tokens, reparam=opts.reparam, gated=opts.gated,
                device=w.device, dtype=w.dtype, value_dim=value_dim,
            )
            adapter.where = f"layer {layer.index} ({layer.name}.{layer.attn_name})"
            if adapter.prefix_gate is not None:
                adapter.prefix_gate.where = adapter.where
            configure_adapter(adapter, opts.form, opts.gate_bias, opts.gate_at)
            attn.add_module(ADAPTER_ATTR, adapter)
        install_attention(attn, adapter)
        return {f"{layer.attn_name}.{ADAPTER_ATTR}.{n}" for n, _ in adapter.named_parameters()}

    def optim_options(self, param_name: str, spec: PolicySpec) -> dict[str, float | None]:
        """Factor and gate: ``gate_lr_scale``, no decay; MLP biases: no decay; rest: lr_scale."""
        opts = _options(spec)
        parts = param_name.split(".")
        if "prefix_gate" in parts or parts[-1] == "prefix_gating_factor":
            return {"lr_scale": opts.gate_lr_scale, "weight_decay": 0.0}
        if "prefix_mlp" in parts and parts[-1] == "bias":
            return {"lr_scale": opts.lr_scale, "weight_decay": 0.0}
        return {"lr_scale": opts.lr_scale, "weight_decay": opts.weight_decay}
