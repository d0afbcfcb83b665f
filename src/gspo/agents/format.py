"""How environment messages become tokens, and where a model turn ends.

The only text gspo ever tokenizes in an episode is the environment's: a message is wrapped as the
model's chat format wraps a tool answer and encoded without special-token additions. The model's own
turns are never re-tokenized (their ids are the sampled ids).

End of a model turn: the engine stops at EOS. A model may also end its turn with the tool-call
closing marker (``</tool_call>``) and go on writing; the runner then cuts the turn right after the
marker's token ids. The kept tokens' log-probabilities are still exactly the sampler's (each was
sampled given only the tokens before it); the tokens after the marker are discarded, never trained.
The marker is matched as a token-id sequence, which is exact for tokenizers where it is one token
(Qwen3's added ``</tool_call>``, the embedded character tokenizer's).
"""

from __future__ import annotations

from dataclasses import dataclass

from gspo.agents.tools import CALL_CLOSE

RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


@dataclass
class MessageFormat:
    """Wraps environment messages as ``prefix + open + message + close + suffix`` and tokenizes them.

    ``end_of_turn``: text written before the message when the model's turn did not end with EOS (a
    chat model's end-of-turn token, so that the context stays in the template's shape).
    """

    tokenizer: object
    prefix: str = ""
    open: str = RESPONSE_OPEN
    close: str = RESPONSE_CLOSE
    suffix: str = ""
    end_of_turn: str = ""
    stop: str = CALL_CLOSE  # a model turn ends after these tokens ("" = only at EOS)

    def __post_init__(self) -> None:
        self.stop_ids = self.encode(self.stop) if self.stop else []

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def message_ids(self, message: str, *, ended_with_eos: bool) -> list[int]:
        """The token ids of one environment message, as they follow the model's turn."""
        head = "" if ended_with_eos else self.end_of_turn
        return self.encode(f"{head}{self.prefix}{self.open}{message}{self.close}{self.suffix}")

    def turn_end(self, ids: list[int]) -> int | None:
        """Length of the turn cut right after the first stop marker in ``ids``, or None (no marker)."""
        n = len(self.stop_ids)
        if not n:
            return None
        for i in range(len(ids) - n + 1):
            if ids[i : i + n] == self.stop_ids:
                return i + n
        return None

    @classmethod
    def qwen3(cls, tokenizer) -> "MessageFormat":
        """Qwen3's chat template for tool answers (a ``user`` turn holding ``<tool_response>``)."""
        return cls(tokenizer, prefix="\n<|im_start|>user\n", open=RESPONSE_OPEN + "\n", close="\n" + RESPONSE_CLOSE,
                   suffix="<|im_end|>\n<|im_start|>assistant\n", end_of_turn="<|im_end|>")

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "MessageFormat":
        """Qwen3's format when the tokenizer has Qwen's ``<|im_start|>``, else the bare tags."""
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return cls.qwen3(tokenizer) if "<|im_start|>" in vocab else cls(tokenizer)
