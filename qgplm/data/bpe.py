"""A byte-level BPE tokenizer trained on a task's training split (HF `tokenizers`).

Why: on 2 CPU cores a small teacher with GPT-2's 50,257-token vocabulary spends most of its
step in the softmax and most of its parameters in the embedding (measured for 4 layers x 256:
1.9 s/step at 50k vs 0.42 s/step at 8k), which would also make the 2-bit embedding dominate the
compression figures. A vocabulary trained on the training split keeps the comparison about the
Transformer, and is saved with the teacher so that every student uses the same one.

The same holds for the small BART of the summarization benchmark (`seq2seq=True`): BART's
special tokens at BART's ids (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4) and its `<s> ... </s>`
framing of every sequence, so the model config and generation defaults stay BART's.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def train_bpe_tokenizer(train_text: str | Iterable[str], vocab_size: int,
                        seq2seq: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=seq2seq)
    tok.decoder = decoders.ByteLevel()
    specials = list(BART_SPECIALS) if seq2seq else [EOS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = train_text.splitlines(keepends=True) if isinstance(train_text, str) else train_text
    tok.train_from_iterator(lines, trainer=trainer)
    if not seq2seq:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                       unk_token=EOS)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")
