"""Small random-init Grounding DINO and MLLM captioner, built in code: for tests and smoke runs only.

No weights exist on these machines, so the ``tiny`` curation models are real transformers
architectures (the same classes and processors the real checkpoints load into) with small widths and
seeded random weights. Their boxes and captions are meaningless; they only show the pipeline runs.
The pipeline resolves the name ``tiny`` to these builders; the production loaders never see it, so
this module depends on the captioner and grounder, never the reverse.

Tokenizers are built from an in-code vocabulary: a BERT-style WordPiece whose special ids match
``bert-base-uncased`` where Grounding DINO hard-codes them ([PAD]=0, [CLS]=101, [SEP]=102, "."=1012,
"?"=1029 delimit phrases), and single characters as word pieces, so any lower-case ASCII text
tokenizes with exact character offsets.
"""

from __future__ import annotations

import re
import string
from typing import Any

import torch

from use_search.curation.captions import PART_AWARE_PROMPT, GenerationParams, MLLMCaptioner
from use_search.curation.grounding import GroundingDinoGrounder
from use_search.model.registry import ENTRIES, TINY

TINY_SEED = 0

COMMON_WORDS = (
    "a an the of at in on is are and with there this that another two three some its his her their "
    "red orange yellow green blue white black brown pink gray grey small large big left right side top "
    "bottom front back behind next to near visible image photo picture man woman person people girl boy "
    "face head hair eye eyes ear ears nose mouth hand hands arm arms leg legs body cat dog rabbit apple "
    "cup coffee table plate saucer spoon rocket sky tree grass water wall floor car bus train chair"
).split()


def bert_style_vocab() -> dict[str, int]:
    """WordPiece vocabulary laid out like bert-base-uncased where Grounding DINO relies on the ids."""
    fixed = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
    pieces: list[str] = []
    for ch in string.ascii_lowercase + string.digits + "".join(c for c in string.punctuation if c not in ".?"):
        pieces.append(ch)
    pieces += ["##" + ch for ch in string.ascii_lowercase + string.digits]
    pieces += [w for w in dict.fromkeys(COMMON_WORDS) if len(w) > 1]
    vocab = dict(fixed)
    free = (i for i in range(1, 1030) if i not in fixed.values())
    for piece in pieces:
        vocab[piece] = next(free)
    for i in free:  # fill the rest of 0..1029 like BERT's [unusedN] slots
        vocab[f"[unused{i}]"] = i
    return vocab


def build_tiny_grounding_dino() -> tuple[Any, Any]:
    """(GroundingDinoForObjectDetection, GroundingDinoProcessor): Swin + BERT, widths 16-32, 256 px."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    vocab = bert_style_vocab()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 256, "longest_edge": 256})
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=256,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=256,
        ),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
        num_queries=20, max_text_len=256, disable_custom_kernels=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = GroundingDinoForObjectDetection(config).eval()
    return model, GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


# A LLaVA-style chat template: "USER: <image>\n{prompt}\nASSISTANT:".
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_mllm() -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, LlavaProcessor): CLIP-ViT 64 px + a 1-layer Llama, word vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    # The chat roles and every word of the paper's prompt are whole tokens: the prompt reaches the model intact.
    prompt_words = re.findall(r"[a-z]+", f"user assistant {PART_AWARE_PROMPT}".lower())
    for piece in [*COMMON_WORDS, *prompt_words, *string.ascii_lowercase, *".,:;!?'-"]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<image>"], chat_template=TINY_CHAT_TEMPLATE,
    )
    image_size, patch = 64, 16
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=3, bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=vocab["<image>"], image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=TINY_CHAT_TEMPLATE, num_additional_image_tokens=1,  # CLIP's class token
    )
    return model, processor


def tiny_mllm_captioner(params: GenerationParams | None, *, device: str, batch_size: int) -> MLLMCaptioner:
    """The captioner ``--mllm tiny`` names (what ``load_mllm_captioner`` gives for a real model)."""
    return MLLMCaptioner(
        *build_tiny_mllm(), params, device=device, model_id=ENTRIES[("mllm", TINY)].model_id, batch_size=batch_size
    )


def tiny_grounder(*, device: str, box_threshold: float, nms_threshold: float) -> GroundingDinoGrounder:
    """The grounder ``--grounding-model tiny`` names (what ``load_grounder`` gives for a real model)."""
    return GroundingDinoGrounder(
        *build_tiny_grounding_dino(), box_threshold=box_threshold, nms_threshold=nms_threshold, device=device,
        model_id=ENTRIES[("grounding", TINY)].model_id,
    )
