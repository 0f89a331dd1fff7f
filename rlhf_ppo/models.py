"""The actor-critic: the trained policy with its critic (a value head, a separate critic or a
critic adapter) in one module, the frozen reference, how they are built from a config, and how
they are saved and loaded back.

Loading single models lives in :mod:`.loading`, LoRA in :mod:`.lora`, the forward-pass helpers
in :mod:`.lm`; their names stay importable from here (``rlhf_ppo.models.load_policy``).

Shape legend: ``B`` batch, ``P`` prompt length (left-padded), ``R`` response length
(right-padded), ``L = P + R``, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from . import ops
from .config import ModelConfig
from .errors import ConfigError, ModelLoadError
from .lm import (
    KEEP_LOGITS_ELEMENTS,
    LOGITS_CHUNK_ELEMENTS,
    backbone_hidden,
    is_partitioned,
    position_ids_from_mask,
    postprocess_logits,
    token_logprobs,
    transformer,
    vocab_rows,
)
from .loading import (
    DTYPES,
    disable_dropout,
    enable_activation_checkpointing,
    freeze,
    load_causal_lm,
    load_model,
    load_policy,
    load_pretrained,
    load_sequence_classifier,
    load_tokenizer,
    plain_after_gguf,
    record_portable_base,
    resolve,
    zero3_partitioned_loading,
)
from .lora import (
    CRITIC_ADAPTER,
    active_adapter,
    add_critic_adapter,
    add_reward_critic_adapter,
    apply_lora,
    is_peft,
    lora_config,
)
from .packing import Packed, pack_for, packed_hidden

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


def response_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_length: int, packed: Packed | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's hidden states at the positions that predict the response tokens, and those
    tokens: padded ``([B, R, H], [B, R])``, or with ``packed`` (:func:`packing.pack` of the same
    batch) only the real response tokens, ``([1, N, H], [1, N])``."""
    if packed is None:
        hidden = backbone_hidden(model, input_ids, attention_mask)
        # Position i predicts token i+1: response tokens P..L-1 are predicted by P-1..L-2.
        return hidden[:, prompt_length - 1:-1], input_ids[:, prompt_length:]
    hidden = packed_hidden(model, packed)
    return hidden[packed.response_index][None], packed.response_tokens[None]


def padded(x: torch.Tensor, packed: Packed | None) -> torch.Tensor:
    """Per-response-token values ``[B, R]`` from :func:`response_states`'s layout."""
    return x if packed is None else packed.unpack(x)


class ActorCritic(nn.Module):
    """The trained models in one module, so one ``accelerator.prepare`` wraps them and one
    forward pass yields log-probs, entropies and values.

    ``critic="shared"``: a linear value head on the policy's last hidden state (one backbone pass).
    ``critic="separate"``: a sequence-classification model whose ``score`` head is applied to
    every position. With LoRA (``critic_adapter``), a second adapter with a value head on its
    last hidden state, so the critic costs no second copy of the weights: on the policy's base
    (``critic`` None), or on the reward model's base (``critic`` is the reward model wrapped by
    PEFT, whose scoring runs with the adapter off; ``value_head`` starts as a copy of its score
    head).
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None,
                 critic_adapter: str | None = None, value_head: nn.Linear | None = None,
                 with_critic: bool = True):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.critic_adapter = critic_adapter
        self.has_critic = with_critic  # False: critic-free estimators (no value head, no critic)
        if with_critic and value_head is None and (critic is None or critic_adapter is not None):
            hidden_size = transformer(critic or policy).config.get_text_config().hidden_size
            # Zero init: values start at 0, as in lm-human-preferences (value head init_scale=0).
            value_head = nn.Linear(hidden_size, 1)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = None if value_head is None else value_head.float()
        self.pack_sequences = False
        """True: forward passes pack the batch's sequences without padding (:mod:`.packing`)"""

    @property
    def _no_split_modules(self) -> list[str]:
        # FSDP's transformer-based auto wrap reads this to find the layer classes to shard.
        return no_split_modules(self.policy, self.critic)

    def _is_critic_adapter(self, name: str) -> bool:
        return self.critic_adapter is not None and f".{self.critic_adapter}." in name

    @property
    def critic_on_reward_model(self) -> bool:
        """True for a LoRA critic adapter on the reward model's base (``critic_init: reward``)."""
        return self.critic is not None and self.critic_adapter is not None

    @property
    def critic_adapter_host(self) -> tuple[str, nn.Module]:
        """``(attribute name, PEFT model)`` that carries the critic adapter: ``critic`` (the
        reward model) or ``policy``; the name prefixes its keys in this module's state dict."""
        name = "critic" if self.critic_on_reward_model else "policy"
        return name, getattr(self, name)

    def policy_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the policy loss."""
        return [p for n, p in self.policy.named_parameters()
                if p.requires_grad and not self._is_critic_adapter(n)]

    def critic_parameters(self) -> list[nn.Parameter]:
        """Parameters of the value head (and critic adapter) or separate critic."""
        modules = [m for m in (self.value_head, self.critic) if m is not None]
        adapter = [p for n, p in self.policy.named_parameters()
                   if p.requires_grad and self._is_critic_adapter(n)]
        return [p for m in modules for p in m.parameters() if p.requires_grad] + adapter

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                temperature: float = 1.0, with_entropy: bool = True,
                backbone_value_grad: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs, entropies and values of the response tokens ``input_ids[:, P:]``.

        Args:
            input_ids, attention_mask: ``[B, L]``, prompt left-padded to ``P = prompt_length``.
            backbone_value_grad: shared head: scale of the value gradient that reaches the
                policy's backbone (0: the head alone learns, as in critic warmup).
        Returns:
            ``(logprobs, entropy, values)``, each ``[B, R]`` float32. ``values[:, t]`` is V of the
            state before response token t (read at the position that predicts it).
        """
        packed = self._pack(input_ids, attention_mask, prompt_length)
        h_resp, tokens = response_states(self.policy, input_ids, attention_mask, prompt_length,
                                         packed)  # (B, R, H), (B, R); packed (1, N, H), (1, N)
        lm = transformer(self.policy)
        logprobs, entropy = token_logprobs(lm.get_output_embeddings(), lm.config,
                                           h_resp, tokens, temperature, with_entropy)
        if not self.has_critic:
            values = torch.zeros_like(logprobs)
        elif self.shares_backbone:
            values = self.shared_values(ops.scale_gradient(h_resp, backbone_value_grad))
        else:
            values = self._critic_values(input_ids, attention_mask, prompt_length, packed)
        return padded(logprobs, packed), padded(entropy, packed), padded(values, packed)

    def _pack(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
              ) -> Packed | None:
        """The batch packed (:mod:`.packing`) when ``pack_sequences``, else None."""
        if not self.pack_sequences:
            return None
        return pack_for(self.policy, input_ids, attention_mask, prompt_length)

    @property
    def shares_backbone(self) -> bool:
        """True when the value head reads the policy's own last hidden state (``critic: shared``
        without a critic adapter), so values come with every policy forward."""
        return self.has_critic and self.critic is None and self.critic_adapter is None

    def shared_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values ``[...]`` float32 from the policy's last hidden states ``[..., H]``."""
        # The head is float32 unless an engine cast the whole module (DeepSpeed bf16).
        return self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
               ) -> torch.Tensor:
        """Values ``[B, R]`` of the response states from the critic's own backbone pass (a
        separate critic or the critic adapter; the shared head: one policy backbone pass; zeros
        without a critic)."""
        if not self.has_critic:
            return torch.zeros(input_ids.shape[0], input_ids.shape[1] - prompt_length,
                               device=input_ids.device)
        packed = self._pack(input_ids, attention_mask, prompt_length)
        return padded(self._critic_values(input_ids, attention_mask, prompt_length, packed),
                      packed)

    def _critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_length: int, packed: Packed | None) -> torch.Tensor:
        """Values in :func:`response_states`'s layout from the critic's backbone pass."""
        args = (input_ids, attention_mask, prompt_length, packed)
        if self.critic_on_reward_model:
            with active_adapter(self.critic, self.critic_adapter):
                return self.shared_values(response_states(self.critic, *args)[0])
        if self.critic is not None:
            h_c = response_states(self.critic, *args)[0]
            # The score head is float32 (set at load) while a bf16/fp16 backbone's output is not.
            return self.critic.score(h_c.to(self.critic.score.weight.dtype)).float().squeeze(-1)
        adapter = self.critic_adapter
        with active_adapter(self.policy, adapter) if adapter else nullcontext():
            return self.shared_values(response_states(self.policy, *args)[0])


def reference_logprobs(ref: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prompt_length: int, temperature: float = 1.0, pack_sequences: bool = False
                       ) -> torch.Tensor:
    """Log-probs ``[B, R]`` of the response tokens under a frozen causal LM (no grad);
    ``pack_sequences``: one padding-free pass (:mod:`.packing`)."""
    with torch.no_grad():
        packed = pack_for(ref, input_ids, attention_mask, prompt_length) if pack_sequences else None
        h_resp, tokens = response_states(ref, input_ids, attention_mask, prompt_length, packed)
        lm = transformer(ref)
        lp, _ = token_logprobs(lm.get_output_embeddings(), lm.config, h_resp, tokens,
                               temperature, with_entropy=False)
    return padded(lp, packed)


def no_split_modules(*models: nn.Module | None) -> list[str]:
    """The transformer layer class names of the given transformers models (FSDP wrapping units)."""
    names: list[str] = []
    for m in models:
        for name in getattr(m, "_no_split_modules", None) or []:
            if name not in names:
                names.append(name)
    return names


class ReferenceModel(nn.Module):
    """A frozen causal LM whose ``forward`` returns response log-probs (see
    :func:`reference_logprobs`): one root module, so an engine can shard it for inference.

    With LoRA the reference *is* the policy's PEFT model, run with its trained adapter disabled
    (``adapter=None``: the bare base) or with the frozen ``adapter`` active (an SFT adapter that
    the policy started from), so the base weights exist once.
    """

    def __init__(self, lm: nn.Module, shared_peft: bool = False, adapter: str | None = None):
        super().__init__()
        self.shared_peft, self.adapter = shared_peft, adapter
        # A shared PEFT model is the policy's: not registered as a submodule (no second copy in
        # state dicts or engines), and not frozen (its adapter trains).
        if shared_peft:
            self.__dict__["lm"] = lm
        else:
            self.lm = freeze(lm)
        self._no_split_modules = no_split_modules(transformer(lm))
        self.pack_sequences = False
        """True: padding-free forward passes (:mod:`.packing`)"""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                temperature: float = 1.0) -> torch.Tensor:
        with self._reference_weights():
            return reference_logprobs(self.lm, input_ids, attention_mask, prompt_length,
                                      temperature, self.pack_sequences)

    @contextmanager
    def _reference_weights(self):
        if not self.shared_peft:
            yield
        else:
            with active_adapter(self.lm, self.adapter):
                yield


def load_reference(cfg: ModelConfig, policy: nn.Module) -> ReferenceModel:
    """The frozen reference of a full (not LoRA) policy: a copy of the just-loaded ``policy``, or
    ``model.ref_name_or_path`` loaded (so is the policy's own checkpoint again under ZeRO-3, where
    a copy of partitioned weights is empty)."""
    if cfg.ref_name_or_path is None and not is_partitioned(policy):
        return ReferenceModel(copy.deepcopy(policy)).eval()
    with zero3_partitioned_loading(cfg.shard_frozen_models):
        if cfg.ref_name_or_path is None:
            ref = load_causal_lm(cfg.name_or_path, cfg, "model.name_or_path", cfg.gguf_file)
        else:
            ref = load_causal_lm(cfg.ref_name_or_path, cfg, "model.ref_name_or_path",
                                 cfg.ref_gguf_file)
    if vocab_rows(ref.get_output_embeddings()) != vocab_rows(policy.get_output_embeddings()):
        raise ModelLoadError("model.ref_name_or_path: the reference's vocabulary size differs "
                             "from the policy's; expected the same tokenizer")
    return ReferenceModel(ref).eval()


def build_actor_critic(cfg: ModelConfig, peft_cfg=None, reward_model: nn.Module | None = None,
                       reward_path: str | None = None, with_critic: bool = True,
                       with_reference: bool = True) -> tuple[ActorCritic, ReferenceModel | None]:
    """Load the policy (with its value head when present) and the reference; return both.
    ``peft_cfg`` (a ``PeftConfig`` with ``enabled``): LoRA, with the reference on the same base.
    ``model.critic_init: reward`` needs the reward model: ``reward_path`` (its folder or hub id,
    the critic's starting weights) and, with LoRA, ``reward_model`` itself (the loaded module,
    which receives the critic adapter). ``with_critic=False`` (critic-free advantage estimators):
    no value head and no critic are built. ``with_reference=False`` (no KL setting reads it):
    no reference is loaded or copied, and None is returned in its place."""
    from_reward = with_critic and cfg.critic == "separate" and cfg.critic_init == "reward"
    if from_reward and reward_path is None:
        raise ModelLoadError("model.critic_init: 'reward' needs a reward model source "
                             "(reward.sources[].model)")
    policy = load_causal_lm(cfg.name_or_path, cfg, "model.name_or_path", cfg.gguf_file)
    if peft_cfg is not None and peft_cfg.enabled:
        if cfg.ref_name_or_path is not None:
            raise ModelLoadError("model.ref_name_or_path: with peft.enabled the reference is the "
                                 "base model (or peft.adapter_path); expected null")
        policy, ref_adapter = apply_lora(policy, peft_cfg)
        ref = (ReferenceModel(policy, shared_peft=True, adapter=ref_adapter) if with_reference
               else None)
        if not with_critic:
            return _named(ActorCritic(policy, with_critic=False), cfg), ref
        if cfg.critic == "separate":
            if cfg.critic_name_or_path is not None:
                raise ModelLoadError("model.critic_name_or_path: with peft.enabled the separate "
                                     "critic is a second adapter on the policy's base (or, with "
                                     "model.critic_init=reward, the reward model's); expected null")
            if from_reward:
                if reward_model is None:
                    raise ModelLoadError("model.critic_init: 'reward' with peft.enabled needs "
                                         "the loaded reward model")
                critic, head = add_reward_critic_adapter(reward_model, peft_cfg)
                return _named(ActorCritic(policy, critic, CRITIC_ADAPTER, value_head=head), cfg), ref
            ac = ActorCritic(policy, critic_adapter=add_critic_adapter(policy, peft_cfg))
            return _named(ac, cfg), ref
    else:
        ref = load_reference(cfg, policy) if with_reference else None
    if not with_critic:
        return _named(ActorCritic(policy, with_critic=False), cfg), ref
    critic = None
    if cfg.critic == "separate":
        if from_reward:
            start, key = reward_path, "model.critic_init (the reward model)"
        else:
            start, key = cfg.critic_name_or_path or cfg.name_or_path, "model.critic_name_or_path"
        critic = load_sequence_classifier(start, cfg, key, trainable=True)
        critic.score.float()
    ac = ActorCritic(policy, critic)
    head_file = Path(resolve(cfg.name_or_path, "model.name_or_path")) / VALUE_HEAD_FILE
    if ac.value_head is not None and head_file.is_file():
        from safetensors.torch import load_file

        ac.value_head.load_state_dict(load_file(head_file))
        logger.info("loaded value head from %s", head_file)
    return _named(ac, cfg), ref


class CriticStart(NamedTuple):
    """The reward model a critic may start from (``model.critic_init: reward``), as the reward
    layer loaded it (:meth:`rewards.RewardSum.critic_start_model`)."""

    model: nn.Module
    """the loaded reward model; with LoRA the critic adapter is added to this very module"""
    path: str
    """its resolved folder or hub id: a separate critic's starting weights"""
    scorer: nn.Module
    """the module that scores with it (``adapters_off``: score without a critic adapter)"""


def build_ppo_models(cfg: ModelConfig, peft_cfg, critic_start: CriticStart | None,
                     with_critic: bool = True, with_reference: bool = True
                     ) -> tuple[ActorCritic, ReferenceModel | None, nn.Module | None]:
    """:func:`build_actor_critic` with the reward model a critic may start from (None: no reward
    model). A LoRA critic adapter on the reward model's base shares its weights with the scorer,
    so that scorer is told to score with adapters off. Returns ``(actor_critic, reference or
    None (``with_reference=False``), that scorer or None)``."""
    model, ref = build_actor_critic(cfg, peft_cfg,
                                    reward_model=critic_start.model if critic_start else None,
                                    reward_path=critic_start.path if critic_start else None,
                                    with_critic=with_critic, with_reference=with_reference)
    if not model.critic_on_reward_model:
        return model, ref, None
    critic_start.scorer.adapters_off = True
    return model, ref, critic_start.scorer


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _named(ac: ActorCritic, cfg: ModelConfig) -> ActorCritic:
    ac.base_name = cfg.name_or_path  # the policy's base as the config names it (portable)
    return ac


def save_actor_critic(ac: ActorCritic, tokenizer, folder: str | Path,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` the policy and tokenizer into ``folder``, the value head beside them
    (``value_head.safetensors``) or the separate critic in ``folder/critic``.

    ``state_dict``: the full ActorCritic state (gathered from shards under ZeRO-3 / FSDP);
    default: the module's own.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    state = ac.state_dict() if state_dict is None else state_dict
    if is_peft(ac.policy):  # the trained adapter only ("reference" is the frozen starting one)
        ac.policy.save_pretrained(folder, selected_adapters=["default"],
                                  state_dict=_sub_state(state, "policy."))
        record_portable_base(folder, getattr(ac, "base_name", None))
        if ac.critic_adapter is not None:  # PEFT writes a named adapter to folder/NAME
            name, host = ac.critic_adapter_host
            host.save_pretrained(folder, selected_adapters=[ac.critic_adapter],
                                 state_dict=_sub_state(state, name + "."))
    else:
        ac.policy.save_pretrained(folder, state_dict=_sub_state(state, "policy."))
    tokenizer.save_pretrained(folder)
    if ac.value_head is not None:
        head = _sub_state(state, "value_head.")
        # A critic adapter's head belongs beside it, not beside the policy (whose own value
        # head a later run would load).
        head_dir = folder / ac.critic_adapter if ac.critic_adapter is not None else folder
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()},
                  head_dir / VALUE_HEAD_FILE)
    elif ac.critic is not None:
        ac.critic.save_pretrained(folder / "critic", state_dict=_sub_state(state, "critic."))
        tokenizer.save_pretrained(folder / "critic")


def save_merged(ac: ActorCritic, tokenizer, folder: str | Path) -> None:
    """Save the LoRA policy with its trained adapter merged into a copy of the base weights, as
    a plain model (``AutoModelForCausalLM.from_pretrained(folder)``)."""
    merged = copy.deepcopy(ac.policy).merge_and_unload(adapter_names=["default"])
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_checkpoint_weights(model: ActorCritic, folder: Path) -> None:
    """Load a checkpoint's policy and value head / critic (as :func:`save_actor_critic` wrote
    them) into an unprepared ActorCritic."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(folder)
    if is_peft(model.policy):  # the trained adapter; the base and "reference" stay as loaded
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.policy, load_file(folder / "adapter_model.safetensors"),
                                  adapter_name="default")
        if model.critic_adapter is not None:  # on the policy's or the reward model's base
            name = model.critic_adapter
            _, host = model.critic_adapter_host
            set_peft_model_state_dict(host, load_file(folder / name / "adapter_model.safetensors"),
                                      adapter_name=name)
            folder = folder / name  # its value head lies beside it
    else:
        saved = AutoModelForCausalLM.from_pretrained(folder,
                                                     dtype=next(model.policy.parameters()).dtype)
        model.policy.load_state_dict(saved.state_dict())
        del saved
    if model.value_head is not None:
        model.value_head.load_state_dict(load_file(folder / VALUE_HEAD_FILE))
    elif model.critic is not None:
        critic = AutoModelForSequenceClassification.from_pretrained(folder / "critic")
        model.critic.load_state_dict(critic.state_dict())


def check_lengths(cfg, model_config, longest_prompt: int, vocab_size: int) -> None:
    """Fail early (instead of deep inside torch) when prompt + response exceed the model's
    context, or a stop token id is outside the vocabulary. ``cfg``: the PPO config."""
    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    limit = ("generation.max_new_tokens" if cfg.response_budget == cfg.generation.max_new_tokens
             else "agent.max_total_tokens")
    need = longest_prompt + cfg.response_budget
    if context is not None and need > context:
        raise ConfigError(
            f"data.max_prompt_length / {limit}: the longest prompt ({longest_prompt} tokens) plus "
            f"{limit}={cfg.response_budget} is {need} tokens, more than the model's context of "
            f"{context} (max_position_embeddings); lower one of them")
    bad = [i for i in cfg.generation.stop_token_ids if not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(f"generation.stop_token_ids: {bad} outside the vocabulary "
                          f"[0, {vocab_size})")


__all__ = [  # this module's names, and those that lived here before the split (kept importable)
    "CRITIC_ADAPTER", "DTYPES", "KEEP_LOGITS_ELEMENTS", "LOGITS_CHUNK_ELEMENTS", "VALUE_HEAD_FILE",
    "ActorCritic", "ConfigError", "CriticStart", "ModelLoadError", "ReferenceModel",
    "active_adapter", "add_critic_adapter", "add_reward_critic_adapter", "apply_lora",
    "backbone_hidden", "build_actor_critic", "build_ppo_models", "check_lengths",
    "disable_dropout", "enable_activation_checkpointing", "freeze", "is_partitioned", "is_peft",
    "load_causal_lm", "load_checkpoint_weights", "load_model", "load_policy", "load_pretrained",
    "load_reference",
    "load_sequence_classifier", "load_tokenizer", "lora_config", "no_split_modules", "padded",
    "plain_after_gguf", "position_ids_from_mask", "postprocess_logits", "record_portable_base",
    "reference_logprobs", "resolve", "response_states", "save_actor_critic", "save_merged",
    "token_logprobs", "transformer", "vocab_rows", "zero3_partitioned_loading",
]
