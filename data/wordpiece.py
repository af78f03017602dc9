"""WordPiece subword tokenizer (BERT's scheme), trained on a run's training text, kept as a JSON string.

Why WordPiece through Hugging Face `tokenizers`: it is the scheme BERT was trained with (so recipes
and numbers compare), its Rust trainer fits a vocabulary to 100k sentences in about a second, and
the library is well kept and reads back the same JSON in Python, Rust or JavaScript. The tokenizer
is stored whole (`Tokenizer.to_str()`) in the data source's meta, so a run directory alone can
tokenize new text, and a fine-tune started from a pretraining run reuses its ids (`from_str`).

Special tokens come first, with fixed ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
"""
import numpy as np

from data.tokenizer import lib as _lib, load
from errors import UserError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))


def train(texts: list[str], vocab_size: int) -> str:
    """A WordPiece tokenizer fitted to `texts`, as its JSON string: the same texts give the same string."""
    tk = _lib()
    if vocab_size <= len(SPECIALS):
        raise UserError(f"data.vocab_size={vocab_size} must exceed the {len(SPECIALS)} special tokens")
    normalizer, pre = tk.normalizers.BertNormalizer(lowercase=True), tk.pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the "##c" pieces in hash-map order, which differs per process, and breaks ties
    # between equally frequent merges by those numbers: the vocabulary would change from run to run
    # (and exact resume compares it). Listed first, sorted, their numbers are fixed and so is the result.
    inner = sorted({c for text in texts for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))
                    for c in word[1:]})
    trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                           special_tokens=[*SPECIALS, *("##" + c for c in inner)])
    fit = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    fit.normalizer, fit.pre_tokenizer = normalizer, pre
    fit.train_from_iterator(texts, trainer, length=len(texts))
    return _tokenizer(fit.get_vocab()).to_str()


def _tokenizer(vocab: dict):
    """BERT's uncased tokenizer over `vocab` (token -> id); only the five specials are special."""
    tk = _lib()
    tok = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tk.decoders.WordPiece()
    # For users of the tokenizer alone: encode(text) gives [CLS] ... [SEP] as the data does.
    tok.post_processor = tk.processors.BertProcessing(("[SEP]", SEP), ("[CLS]", CLS))
    tok.add_special_tokens(list(SPECIALS))
    return tok


def has_specials(json_str: str) -> bool:
    """Whether a tokenizer numbers [PAD] [UNK] [CLS] [SEP] [MASK] 0-4, as the data and models here read them."""
    tok = load(json_str)
    return all(tok.token_to_id(s) == i for i, s in enumerate(SPECIALS))


def vocab_size(json_str: str) -> int:
    return load(json_str).get_vocab_size()


def encode(json_str: str, texts: list[str], seq_len: int) -> tuple[np.ndarray, int]:
    """(ids N x seq_len int32: [CLS] tokens [SEP], then [PAD]=0; count of texts cut to fit)."""
    tok = load(json_str)
    ids_N = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    room = seq_len - 2
    if room < 1:
        raise UserError(f"data.seq_len={seq_len} leaves no room beside [CLS] and [SEP]; use 3 or more")
    out_NL = np.full((len(ids_N), seq_len), PAD, np.int32)
    cut = 0
    for n, ids in enumerate(ids_N):
        cut += len(ids) > room
        ids = [CLS, *ids[:room], SEP]
        out_NL[n, :len(ids)] = ids
    return out_NL, cut


def decode(json_str: str, ids) -> str:
    """Text of token ids, special tokens left out."""
    return load(json_str).decode([int(i) for i in ids], skip_special_tokens=True)
