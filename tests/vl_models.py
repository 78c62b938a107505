"""Tiny transformers language models with a word-level tokenizer, built from configs and saved with
`save_pretrained`, as transformers' own tests build them: the language models of `vl:` backbones in the tests."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

WORDS = ("a the red green blue circle square triangle left right of above below is there yes no true false "
         "caption vqa gqa nlvr what color shape").split()

def tokenizer(d) -> int:
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<s>"] + WORDS + [":", "?", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")
    fast.save_pretrained(d)
    return len(vocab)

def t5(d):
    from transformers import T5Config, T5ForConditionalGeneration
    n = tokenizer(d)
    cfg = T5Config(vocab_size=n, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(cfg).save_pretrained(d)

def gpt2(d):
    from transformers import GPT2Config, GPT2LMHeadModel
    n = tokenizer(d)
    cfg = GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=2, n_positions=256, pad_token_id=0, eos_token_id=1,
                     bos_token_id=3)
    GPT2LMHeadModel(cfg).save_pretrained(d)

def llama(d):
    from transformers import LlamaConfig, LlamaForCausalLM
    n = tokenizer(d)
    cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(d)

def bart(d):
    from transformers import BartConfig, BartForConditionalGeneration
    n = tokenizer(d)
    cfg = BartConfig(vocab_size=n, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, eos_token_id=1,
                     bos_token_id=3, decoder_start_token_id=1, forced_eos_token_id=1)
    BartForConditionalGeneration(cfg).save_pretrained(d)

BUILDERS = {"t5": t5, "gpt2": gpt2, "llama": llama, "bart": bart}


def make_lm(kind: str, root: Path) -> Path:
    """Directory of a tiny `kind` language model (t5, bart, gpt2, llama) and its tokenizer."""
    d = Path(root) / kind
    if not (d / "config.json").is_file():
        BUILDERS[kind](str(d))
    return d
