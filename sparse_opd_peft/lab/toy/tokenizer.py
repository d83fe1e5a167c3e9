"""A character-level tokenizer that is a real ``transformers`` fast tokenizer.

One token per character of :data:`CHARS`, plus ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2) and ``<unk>`` (3).
Encoding prepends ``<bos>`` (``add_special_tokens=True``, the default) and never appends ``<eos>``; decoding
concatenates characters with no separators, so ``decode(encode(s), skip_special_tokens=True) == s`` for any string
over :data:`CHARS`. Padding is on the left (generation-friendly). It saves with ``save_pretrained`` and loads back
with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARS = "0123456789+-*=: "


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the toy character tokenizer (20 tokens: 4 specials then the characters of :data:`CHARS`).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``padding_side="left"``; ``tokenizer("12+3=")["input_ids"]`` is
        ``[bos_id, id('1'), id('2'), id('+'), id('3'), id('=')]``. Characters outside :data:`CHARS` map to ``<unk>``.
    """
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    bos_id = vocab[BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=1024,
    )
