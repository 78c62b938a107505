"""Tiny transformers VLMs built from random configs and saved with `save_pretrained` (model, tokenizer, image
processor or processor), as transformers' own tests build them: LLaVA, Idefics3, SmolVLM, BLIP and a ViT + BERT
vision-encoder-decoder. Images are 24-30 px, every tower has 2 layers of width 32 (the ViT 48, so that
the vision-encoder-decoder projects its output)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

WORDS = ("a the red green blue circle square triangle left right of above below is there yes no true false "
         "caption vqa gqa nlvr what color shape user assistant").split()
IMAGE_SPECIALS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
CHAT = ("{% for m in messages %}{{ m['role'] }} :{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}")


def tokenizer(d, *, bert: bool = False, extra=()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: `<s> text` (decoder-only LMs) or `[CLS] text [SEP]` (BLIP's BERT-style decoder)."""
    specials = ["[PAD]", "[SEP]", "[UNK]", "[CLS]", "[DEC]"] if bert else ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [":", "?", ".", "\n", *extra])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[2]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bert:
        tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 3), ("[SEP]", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", sep_token="[SEP]", unk_token="[UNK]",
                                       cls_token="[CLS]", bos_token="[DEC]", eos_token="[SEP]")
    else:
        tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       bos_token="<s>", extra_special_tokens={"image_token": "<image>"}
                                       if "<image>" in extra else None)
    if extra:
        fast.add_special_tokens({"additional_special_tokens": [t for t in extra if t.startswith("<")]})
    fast.save_pretrained(d)
    return fast


def _llama(vocab: int) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "num_key_value_heads": 2, "pad_token_id": 0,
            "eos_token_id": 1, "bos_token_id": 3, "max_position_embeddings": 256, **SMALL}


def llava(d):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tokenizer(d, extra=IMAGE_SPECIALS)
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = {"model_type": "clip_vision_model", "image_size": 30, "patch_size": 6, "projection_dim": 32, **SMALL}
    cfg = LlavaConfig(vision_config=vision, text_config=_llama(len(tok)), image_token_index=image_id,
                      image_seq_length=25, vision_feature_layer=-1, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(cfg).save_pretrained(d)
    images = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=6, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=CHAT).save_pretrained(d)


def _idefics_parts(d, model_type: str):
    tok = tokenizer(d, extra=IMAGE_SPECIALS)
    vision = {"image_size": 24, "patch_size": 6, **SMALL}
    text = _llama(len(tok))
    return tok, dict(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                     scale_factor=2, pad_token_id=0)


def idefics3(d):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok, kw = _idefics_parts(d, "idefics3")
    Idefics3ForConditionalGeneration(Idefics3Config(**kw)).save_pretrained(d)
    images = Idefics3ImageProcessor(size={"longest_edge": 24}, max_image_size={"longest_edge": 24})
    Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4).save_pretrained(d)


def smolvlm(d):
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tok, kw = _idefics_parts(d, "smolvlm")
    SmolVLMForConditionalGeneration(SmolVLMConfig(**kw)).save_pretrained(d)
    images = SmolVLMImageProcessor(size={"longest_edge": 24}, max_image_size={"longest_edge": 24})
    SmolVLMProcessor(image_processor=images, tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                     image_seq_len=4, chat_template=CHAT).save_pretrained(d)


def blip(d):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = tokenizer(d, bert=True)
    text = {"vocab_size": len(tok), "encoder_hidden_size": 32, "bos_token_id": 4, "sep_token_id": 1,
            "pad_token_id": 0, "eos_token_id": 1, "max_position_embeddings": 64, **SMALL}
    vision = {"image_size": 30, "patch_size": 6, "initializer_range": 0.02, **SMALL}  # BLIP's default is 1e-10
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(d)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 30, "width": 30}),
                  tokenizer=tok).save_pretrained(d)


def vision_encoder_decoder(d):
    from transformers import (
        BertConfig,
        BertLMHeadModel,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    tok = tokenizer(d)
    enc = ViTModel(ViTConfig(image_size=30, patch_size=6, **{**SMALL, "hidden_size": 48}))  # wider: a projector
    dec = BertLMHeadModel(BertConfig(vocab_size=len(tok), pad_token_id=0, bos_token_id=3, eos_token_id=1,
                                     max_position_embeddings=64, is_decoder=True, add_cross_attention=True, **SMALL))
    model = VisionEncoderDecoderModel(encoder=enc, decoder=dec)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 3, 0, 1
    model.save_pretrained(d)
    ViTImageProcessor(size={"height": 30, "width": 30}).save_pretrained(d)


def vision_encoder_decoder_gpt2(d):
    """A ViT encoder and a GPT-2 decoder (vit-gpt2 captioners): Conv1D projections, c_attn fusing q, k, v."""
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor, ViTModel

    tok = tokenizer(d)
    enc = ViTModel(ViTConfig(image_size=30, patch_size=6, **{**SMALL, "hidden_size": 48}))
    dec = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                                     bos_token_id=3, eos_token_id=1, add_cross_attention=True))
    model = VisionEncoderDecoderModel(encoder=enc, decoder=dec)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 3, 0, 1
    model.save_pretrained(d)
    ViTImageProcessor(size={"height": 30, "width": 30}).save_pretrained(d)


BUILDERS = {"llava": llava, "idefics3": idefics3, "smolvlm": smolvlm, "blip": blip,
            "vision-encoder-decoder": vision_encoder_decoder, "vision-encoder-decoder-gpt2": vision_encoder_decoder_gpt2}


def make_vlm(kind: str, root: Path) -> Path:
    """Directory of a tiny `kind` VLM with its tokenizer and image processor (see BUILDERS)."""
    d = Path(root) / kind
    if not (d / "config.json").is_file():
        BUILDERS[kind](str(d))
    return d
