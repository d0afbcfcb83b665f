"""Prompts are tokenized the way the model expects: BOS exactly once, from the tokenizer's own convention."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from gspo.tasks.render import PromptRenderer

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "what": 4, "is": 5, "2+2": 6, "?": 7, "[u]": 8, "[a]": 9}


def _tokenizer(*, bos: bool, adds_bos: bool, adds_eos: bool = False, template: str | None = None):
    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos or adds_eos:
        single = " ".join([*(["<s>"] if adds_bos else []), "$A", *(["</s>"] if adds_eos else [])])
        core.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>" if bos else None)
    if template:
        tok.chat_template = template
    return tok


def test_plain_text_gets_the_tokenizers_bos_once():
    # a base model whose tokenizer adds BOS and has no chat template: the case that trained on nothing before
    render = PromptRenderer(_tokenizer(bos=True, adds_bos=True))
    assert render({"prompt": "what is 2+2 ?"}) == [1, 4, 5, 6, 7]


def test_plain_text_never_ends_with_an_appended_eos():
    render = PromptRenderer(_tokenizer(bos=True, adds_bos=True, adds_eos=True))
    assert render({"prompt": "what is 2+2 ?"}) == [1, 4, 5, 6, 7]


def test_tokenizer_without_bos_adds_nothing():
    render = PromptRenderer(_tokenizer(bos=False, adds_bos=False))
    assert render({"prompt": "what is 2+2 ?"}) == [4, 5, 6, 7]


@pytest.mark.parametrize("adds_bos", [False, True])
def test_chat_template_that_writes_bos_is_not_double_bosed(adds_bos):
    template = "{{ bos_token }}{% for m in messages %}[u] {{ m['content'] }} {% endfor %}[a]"
    render = PromptRenderer(_tokenizer(bos=True, adds_bos=adds_bos, template=template))
    assert render({"prompt": "what is 2+2 ?"}) == [1, 8, 4, 5, 6, 7, 9]


def test_chat_template_without_bos_is_used_as_written():
    template = "{% for m in messages %}[u] {{ m['content'] }} {% endfor %}[a]"
    render = PromptRenderer(_tokenizer(bos=True, adds_bos=True, template=template))
    assert render({"prompt": "what is 2+2 ?"}) == [8, 4, 5, 6, 7, 9]


def test_the_bos_variant_of_the_embedded_tokenizer_is_rendered_and_trained_with_one_bos():
    from gspo.models.tiny import build_char_tokenizer
    from gspo.sft import encode_sft_batch

    tok = build_char_tokenizer(bos=True)
    ids = PromptRenderer(tok)({"prompt": "12+3="})
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    batch = encode_sft_batch(tok, [{"prompt": "12+3=", "answer": "15"}])
    assert batch["input_ids"][0, : len(ids)].tolist() == ids  # SFT saw exactly what RL will render
    plain = build_char_tokenizer()
    assert PromptRenderer(plain)({"prompt": "12+3="}) == plain("12+3=", add_special_tokens=False)["input_ids"]
