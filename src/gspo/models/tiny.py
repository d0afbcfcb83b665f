"""The embedded tiny model: a character-level tokenizer and a ~1M-parameter Hugging Face Qwen3.

Both are plain Hugging Face objects, so everything downstream (``save_pretrained``,
``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``, ``model.generate``) works unchanged and
offline: nothing here touches a hub.

Tokenizer conventions (the trainer relies on them):
- one token per character of :data:`ALPHABET`; a character outside it maps to ``<unk>``;
- encoding adds NO special tokens (no BOS, no EOS): ``encode("12+3=")`` is exactly five ids. The model
  is trained to emit ``<eos>`` itself, and the trainer appends nothing;
- ids are fixed: ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2, then the alphabet in order;
- decoding concatenates characters (no spaces inserted between tokens).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2
ALPHABET = "0123456789+-*= "  # everything the arithmetic task writes, plus a space


BOS_TOKEN = "<bos>"


def build_char_tokenizer(alphabet: str = ALPHABET, *, bos: bool = False) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character of ``alphabet`` and no automatic special tokens.

    ``bos``: like a base model's tokenizer, encoding text adds a ``<bos>`` token in front (id after the
    alphabet, so the other ids are unchanged) and there is no chat template.
    """
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + i for i, char in enumerate(alphabet)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character (space included) becomes its own pre-token, hence its own token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens without separators
    extra = {}
    if bos:
        vocab_size = len(vocab)
        backend.add_special_tokens([BOS_TOKEN])
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A",
                                                               special_tokens=[(BOS_TOKEN, vocab_size)])
        extra["bos_token"] = BOS_TOKEN
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        **extra,
        padding_side="left",  # generation-friendly default; training code pads explicitly
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


def build_tiny_qwen3(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 64,
    seed: int | None = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 sized to ``tokenizer`` (about 0.9M parameters by default).

    Embeddings are tied (the vocabulary is tiny, so this mostly keeps the config standard). The
    pad/eos ids are written into both ``config`` and ``generation_config`` so ``generate`` stops on
    ``<eos>`` without extra arguments. ``seed`` (if not None) makes the initialisation reproducible
    without disturbing the caller's global RNG state.
    """
    import torch

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_sliding_window=False,
    )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return model
