"""A sequence-classification model as a reward: ``reward.functions=rm:<model dir>@weight``.

The model directory is any local Hugging Face ``*ForSequenceClassification`` with one label (a reward
model); its logit at the last token of ``prompt + completion`` is the reward. It is a *batched*
reward (see :mod:`gspo.tasks.rewards`): a step's completions are sorted by length and scored in as few
forwards as keep each within ``batch_tokens`` padded tokens (:data:`BATCH_TOKENS`; a longer text runs
alone), right padded so that padding changes neither positions nor scores. Text: with a chat template in the reward
model's tokenizer, the row's prompt (string or chat messages) plus the completion as the assistant
turn, rendered by that template; without one, the prompt text followed by the completion. Inputs longer
than the reward model's context are cut from the left (the end of the completion is what it scores).

Loaded like the policy: local files only, ``trust_remote_code`` off, ``auto_map`` refused, frozen, in
float32. Rows without a readable prompt still work: the ``prompt`` argument is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from gspo.errors import ConfigError, ModelLoadError
from gspo.tasks.base import Row


# Padded tokens (rows x longest) per reward-model forward: a no-grad pass, but its attention and MLP
# activations still grow with the batch (256 responses of 2k tokens are 512k tokens in one forward).
BATCH_TOKENS = 16_384


class RewardModel:
    """Scores completions with a one-label sequence-classification model, in forwards of at most
    ``batch_tokens`` padded tokens."""

    batched = True  # called as (prompts, completions, rows) -> list[float] by gspo.tasks.rewards.score

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None,
                 batch_tokens: int = BATCH_TOKENS) -> None:
        from transformers import AutoModelForSequenceClassification

        self.path = _check_directory(Path(path).expanduser())
        config = _load_config(self.path)
        self.tokenizer = _load_tokenizer(self.path)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.path, local_files_only=True, trust_remote_code=False, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"reward model '{self.path}': could not load its weights ({exc})") from None
        self.model.to(device or "cpu").eval().requires_grad_(False)
        # The model pools at the last token that is not padding: it must know the pad id, also for pad = EOS.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = getattr(config, "max_position_embeddings", None)
        self.use_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.batch_tokens = batch_tokens

    def text(self, prompt: str, completion: str, row: Row) -> str:
        """What the reward model reads for one completion (see the module docstring)."""
        full = row.get("prompt", prompt)
        if self.use_template:
            messages = [{"role": "user", "content": full}] if isinstance(full, str) else list(full)
            messages.append({"role": "assistant", "content": completion})
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not isinstance(full, str):
            full = "\n".join(str(m.get("content", "")) for m in full)
        return full + completion

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], rows: Sequence[Row]) -> list[float]:
        texts = [self.text(p, c, r) for p, c, r in zip(prompts, completions, rows)]
        device = next(self.model.parameters()).device
        options = {"truncation": self.max_length is not None, "max_length": self.max_length,
                   "add_special_tokens": not self.use_template}
        lengths = [len(ids) for ids in self.tokenizer(texts, **options)["input_ids"]]
        scores = [0.0] * len(texts)
        for group in token_groups(lengths, self.batch_tokens):
            batch = self.tokenizer([texts[i] for i in group], padding=True, return_tensors="pt", **options).to(device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (b, 1)
            for i, score in zip(group, logits[:, 0].float().tolist()):
                scores[i] = score
        return scores


def token_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped longest first so that each group's rows x longest stays within
    ``budget`` (a row longer than the budget gets a group of its own); every index exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)  # the group's first row is its longest
        else:
            groups.append([i])
    return groups


def _check_directory(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ConfigError(f"reward model 'rm:{path}': not a Hugging Face model directory (no config.json); "
                          "give the local directory of a sequence-classification model, e.g. rm:./my-rm@0.5")
    from gspo.models.load import refuse_custom_code

    refuse_custom_code(path)
    return path


def _load_config(path: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"reward model '{path}/config.json' is not a valid model config ({exc})") from None
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ModelLoadError(f"reward model '{path}' is a '{config.model_type}' model, which transformers has no "
                             "sequence-classification class for")
    if config.num_labels != 1:
        raise ModelLoadError(f"reward model '{path}' has {config.num_labels} labels; a reward model has one "
                             "(its logit is the reward): save it with num_labels=1")
    return config


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"reward model '{path}' has no usable tokenizer ({exc})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"reward model '{path}': its tokenizer has neither a pad nor an EOS token, so a "
                                 "batch cannot be padded; set tokenizer.pad_token and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # positions of real tokens do not depend on the batch
    tokenizer.truncation_side = "left"  # keep the end of the completion
    return tokenizer
