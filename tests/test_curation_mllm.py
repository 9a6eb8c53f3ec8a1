"""The MLLM captioner's plumbing on tiny random-init vision-language models built here (paper §3.1, §4.1).

Three prompt styles, each with a real transformers model: a chat-template processor (the project's tiny
LLaVA, and a tiny Qwen2-VL whose prompts differ in length per image, so batches are padded), a plain
processor (LLaVA's processor without a template), and a CogVLM-style checkpoint that ships its own
code (a local folder with ``configuration_*.py`` / ``modeling_*.py`` written here, loaded through
transformers' remote-code path, its tokenizer in another folder as CogVLM's is). Random weights
caption gibberish: the asserts are on what reaches the model, the sampling settings, which tokens are
decoded, and batching, each against ``model.generate`` called directly.
"""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from use_search.curation.captions import (
    PART_AWARE_PROMPT,
    GenerationParams,
    MLLMCaptioner,
    load_mllm_captioner,
    prompt_style,
)
from use_search.curation.hf import RemoteCodeError
from use_search.curation.shards import iter_shard_records
from use_search.curation.tiny import build_tiny_mllm

PROMPT_WORDS = re.findall(r"[a-z]+", PART_AWARE_PROMPT.lower())
GREEDY = GenerationParams(top_k=1, max_new_tokens=8)  # sampling among one token: deterministic


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size))


# Different sizes: Qwen2-VL gives them 4, 6 and 12 image tokens, so a batch of them is padded.
IMAGES = [photo("astronaut", (56, 56)), photo("coffee", (84, 56)), photo("chelsea", (112, 84))]


def words_in(ids: torch.Tensor, tokenizer) -> list[str]:
    return re.findall(r"[a-z]+", tokenizer.decode(ids, skip_special_tokens=False).lower())


def contains(seq: list[str], sub: list[str]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


class FirstForward:
    """Records the ``input_ids`` of the model's first forward (the prompt; later steps see one token)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.input_ids: torch.Tensor | None = None
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):  # noqa: ANN001
        if self.input_ids is None and kwargs.get("input_ids") is not None:
            self.input_ids = kwargs["input_ids"].clone()


def word_tokenizer(words: list[str], special: list[str], **kw):
    """A word-level fast tokenizer, built offline: every listed word is one token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for piece in [*special, "<unk>", *words, *string.ascii_lowercase, *".,:;!?'-\n"]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kw), vocab


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok, vocab = word_tokenizer(
        [*PROMPT_WORDS, "user", "assistant"], special, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=special[1:], chat_template=QWEN_TEMPLATE,
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE,
    )
    ids = {k: vocab[v] for k, v in dict(eos="<|im_end|>", pad="<|endoftext|>").items()}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=ids["eos"], eos_token_id=ids["eos"],
            pad_token_id=ids["pad"], rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4},
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        eos_token_id=ids["eos"], pad_token_id=ids["pad"], initializer_range=0.2,  # images move the tokens
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).eval()
    return model, processor


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen2_vl()


@pytest.fixture(scope="module")
def llava():
    return build_tiny_mllm()


def reference(captioner: MLLMCaptioner, enc: dict, seed: int) -> list[str]:
    """``generate`` called directly with the paper's settings, the prompt cut off by hand."""
    p = captioner.params
    torch.manual_seed(seed)
    out = captioner.model.generate(
        **enc, do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_new_tokens=p.max_new_tokens,
        pad_token_id=captioner.tokenizer.pad_token_id,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in captioner.tokenizer.batch_decode(new, skip_special_tokens=True)]


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_chat_template_prompt_reaches_the_model_and_only_new_tokens_are_decoded(which, request):
    model, processor = request.getfixturevalue(which)
    captioner = MLLMCaptioner(model, processor, GenerationParams(max_new_tokens=10))
    assert captioner.style == "chat"
    assert captioner.generation_kwargs() == {
        "do_sample": True, "temperature": 0.8, "top_p": 0.4, "top_k": 5, "max_new_tokens": 10,  # §4.1
        "pad_token_id": captioner.tokenizer.pad_token_id,
    }
    seen = FirstForward(model)
    torch.manual_seed(7)
    (caption,) = captioner.caption_images(IMAGES[:1])
    seen.handle.remove()
    # The prompt, word for word, went in after the image.
    assert contains(words_in(seen.input_ids[0], captioner.tokenizer), PROMPT_WORDS)
    enc = captioner.inputs(IMAGES[:1])
    assert torch.equal(seen.input_ids, enc["input_ids"])
    assert [caption] == reference(captioner, enc, seed=7)
    # Not the prompt echoed back: at most max_new_tokens word-level tokens.
    assert not contains(re.findall(r"[a-z]+", caption.lower()), PROMPT_WORDS[:4])
    assert len(captioner.tokenizer(caption, add_special_tokens=False)["input_ids"]) <= 10


def test_sampling_settings_reach_generate(qwen):
    model, processor = qwen
    greedy = MLLMCaptioner(model, processor, GREEDY)
    enc = greedy.inputs(IMAGES[2:])
    out = model.generate(**enc, do_sample=False, max_new_tokens=8)
    expected = processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    for seed in range(3):  # top-k 1 sampling is greedy decoding, whatever the seed
        torch.manual_seed(seed)
        assert greedy.caption_images(IMAGES[2:]) == [expected]
    paper = MLLMCaptioner(model, processor, GenerationParams(max_new_tokens=8))
    captions = set()
    for seed in range(6):  # top-k 5, top-p 0.4, temperature 0.8: the seed changes the caption
        torch.manual_seed(seed)
        captions |= set(paper.caption_images(IMAGES[2:]))
    assert len(captions) > 1


def test_batches_are_left_padded_and_caption_each_image(qwen):
    model, processor = qwen
    one = MLLMCaptioner(model, processor, GREEDY, batch_size=1)
    singles = [one.caption_images([im])[0] for im in IMAGES]
    assert len(set(singles)) == 3  # the images, not only the prompt, decide the caption
    enc = MLLMCaptioner(model, processor, GREEDY, batch_size=3).inputs(IMAGES)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and enc["attention_mask"][:, -1].all()  # padded on the left
    for batch_size in (3, 2):
        assert MLLMCaptioner(model, processor, GREEDY, batch_size=batch_size).caption_images(IMAGES) == singles
    captions = MLLMCaptioner(model, processor, GREEDY, batch_size=2).captions_batch(["a", "b", "c"], IMAGES)
    assert [[c.text for c in caps] for caps in captions] == [[s] if s else [] for s in singles]
    assert all(c.source == "caption:mllm" for caps in captions for c in caps)


def test_plain_processor_gets_the_prompt_through_the_template(llava):
    from transformers import LlavaProcessor

    model, chat_processor = llava
    plain_processor = LlavaProcessor(
        image_processor=chat_processor.image_processor, tokenizer=chat_processor.tokenizer, patch_size=16,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    plain_processor.chat_template = None
    plain_processor.tokenizer.chat_template = None
    assert prompt_style(model, plain_processor) == "plain"
    template = "USER: <image>\n{prompt}\nASSISTANT:"  # what the tiny LLaVA's chat template renders
    plain = MLLMCaptioner(model, plain_processor, GenerationParams(max_new_tokens=6, prompt_template=template))
    chat = MLLMCaptioner(model, chat_processor, GenerationParams(max_new_tokens=6))
    assert plain.style == "plain" and plain.prompt_text() == template.replace("{prompt}", PART_AWARE_PROMPT)
    assert torch.equal(plain.inputs(IMAGES[:2])["input_ids"], chat.inputs(IMAGES[:2])["input_ids"])
    torch.manual_seed(3)
    caption = plain.caption_images(IMAGES[:2])
    assert caption == reference(plain, plain.inputs(IMAGES[:2]), seed=3)

    with pytest.raises(ValueError, match="must contain \\{prompt\\}"):
        GenerationParams(prompt_template="USER: <image> describe ASSISTANT:")
    with pytest.raises(ValueError, match="takes no images"):
        prompt_style(model, chat_processor.tokenizer.__class__(tokenizer_object=chat_processor.tokenizer.backend_tokenizer))


# ---------------------------------------------------------------------------------------------------
# A checkpoint with its own code, shaped like CogVLM's (THUDM/cogvlm-chat-hf): loaded with
# AutoModelForCausalLM + trust_remote_code, inputs from model.build_conversation_input_ids(tokenizer,
# query=..., history=[], images=[image]) with token_type_ids marking the vision tokens, images passed to
# generate as [[tensor]], the tokenizer (Vicuna's for CogVLM) in another repository.

CONFIGURATION_PY = '''
from transformers import LlamaConfig


class TinyCogConfig(LlamaConfig):
    model_type = "tiny_cogvlm"
'''

MODELING_PY = '''
import numpy as np
import torch
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_tinycog import TinyCogConfig

VISION_TOKENS = 4


class TinyCogForCausalLM(LlamaForCausalLM):
    config_class = TinyCogConfig

    def __init__(self, config):
        super().__init__(config)
        self.vision = nn.Linear(3, config.hidden_size)
        self.post_init()

    def build_conversation_input_ids(self, tokenizer, *, query, history=None, images=None, template_version=None):
        ids = tokenizer(f"Question: {query} Answer:", add_special_tokens=False)["input_ids"]
        input_ids = [tokenizer.bos_token_id] + [tokenizer.pad_token_id] * VISION_TOKENS + ids
        token_type_ids = [0] + [1] * VISION_TOKENS + [0] * len(ids)
        pixels = np.asarray(images[0].convert("RGB").resize((8, 8)), dtype=np.float32) / 255
        return {"input_ids": torch.tensor(input_ids), "token_type_ids": torch.tensor(token_type_ids),
                "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
                "images": [torch.from_numpy(pixels).permute(2, 0, 1)]}

    def forward(self, input_ids=None, images=None, token_type_ids=None, attention_mask=None, inputs_embeds=None,
                **kwargs):
        prefill = images is not None and token_type_ids is not None and input_ids.shape[1] == token_type_ids.shape[1]
        if inputs_embeds is None and prefill:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            for b, sample in enumerate(images):
                feature = self.vision(sample[0].to(inputs_embeds.dtype).mean(dim=(1, 2)) * 50)
                inputs_embeds[b, token_type_ids[b] == 1] = feature
            input_ids = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
'''


# CogVLM's Hub code updates its generation state through a GenerationMixin method that transformers
# has since removed (as this override does, word for word in the call).
LEGACY_PY = '''

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            standardize_cache_format=False, **kwargs):
        model_kwargs["past_key_values"] = self._extract_past_from_model_output(
            outputs, standardize_cache_format=standardize_cache_format
        )
        return model_kwargs
'''


def write_remote_code_model(root, legacy: bool = False):
    """(model folder, tokenizer folder): the model's files as a Hub repository holds them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, tok_dir = root / ("tiny-cogvlm-legacy" if legacy else "tiny-cogvlm"), root / "tiny-vicuna-tokenizer"
    model_dir.mkdir(parents=True)
    (model_dir / "configuration_tinycog.py").write_text(CONFIGURATION_PY)
    (model_dir / "modeling_tinycog.py").write_text(MODELING_PY + (LEGACY_PY if legacy else ""))
    tok, vocab = word_tokenizer([*PROMPT_WORDS, "question", "answer"], ["<pad>", "<s>", "</s>"],
                                bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(tok_dir)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "tiny_cogvlm", "architectures": ["TinyCogForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tinycog.TinyCogConfig",
                     "AutoModelForCausalLM": "modeling_tinycog.TinyCogForCausalLM"},
        "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "bos_token_id": vocab["<s>"], "eos_token_id": vocab["</s>"], "pad_token_id": vocab["<pad>"],
        "initializer_range": 0.2,
    }))
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    model.save_pretrained(model_dir)  # weights beside the code
    return model_dir, tok_dir


@pytest.fixture(scope="module")
def remote_code(tmp_path_factory):
    """Builds the folder with transformers' module cache in a temporary folder, and cleans up after."""
    import transformers.dynamic_module_utils as dmu

    modules = tmp_path_factory.mktemp("hf-modules")
    saved = dmu.HF_MODULES_CACHE
    dmu.HF_MODULES_CACHE = str(modules)
    try:
        hub = tmp_path_factory.mktemp("hub")
        legacy_dir, _ = write_remote_code_model(hub / "legacy", legacy=True)
        yield (*write_remote_code_model(hub), modules, legacy_dir)
    finally:
        dmu.HF_MODULES_CACHE = saved
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]
        if str(modules) in sys.path:
            sys.path.remove(str(modules))


def test_remote_code_needs_the_flag(remote_code):
    model_dir, tok_dir, *_ = remote_code
    with pytest.raises(RemoteCodeError, match="(?s)ships its own Python code.*--trust-remote-code.*rights"):
        load_mllm_captioner(str(model_dir), processor=str(tok_dir), offline=True)


def test_remote_code_model_captions_through_its_conversation_builder(remote_code):
    model_dir, tok_dir, *_ = remote_code
    captioner = load_mllm_captioner(
        str(model_dir), processor=str(tok_dir), offline=True, trust_remote_code=True,
        params=GenerationParams(max_new_tokens=8), dtype="float32",
    )
    assert type(captioner.model).__name__ == "TinyCogForCausalLM" and captioner.style == "conversation"
    enc = captioner.conversation_inputs(IMAGES[0])
    assert enc["input_ids"].shape[0] == 1 and enc["token_type_ids"].sum() == 4 and len(enc["images"][0]) == 1
    assert contains(words_in(enc["input_ids"][0], captioner.tokenizer), ["question", *PROMPT_WORDS, "answer"])
    torch.manual_seed(11)
    (caption,) = captioner.caption_images(IMAGES[:1])
    assert [caption] == reference(captioner, captioner.conversation_inputs(IMAGES[0]), seed=11)
    # One image per generate call, each image its own caption.
    greedy = MLLMCaptioner(captioner.model, captioner.processor, GREEDY, batch_size=3)
    captions = greedy.caption_images(IMAGES)
    assert captions == [greedy.caption_images([im])[0] for im in IMAGES] and len(set(captions)) > 1


def test_curate_run_cli_with_a_remote_code_mllm(remote_code, tmp_path):
    model_dir, tok_dir, *_ = remote_code
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(IMAGES[2]).save(photos / "cat.png")
    env = {**os.environ, "USE_SEARCH_DATA_DIR": str(tmp_path / "data"), "USE_SEARCH_CONFIG": "/nonexistent",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "COLUMNS": "200"}
    args = [sys.executable, "-m", "use_search", "--preset", "tiny", "--offline", "curate", "run", str(photos),
            "--out", str(tmp_path / "pairs"), "--mllm", str(model_dir), "--mllm-processor", str(tok_dir),
            "--mllm-max-new-tokens", "12"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "--trust-remote-code" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "modules").exists() or not any((tmp_path / "modules").rglob("modeling_tinycog.py"))

    r = subprocess.run([*args, "--trust-remote-code"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 / 0 / 1 / 0" in r.stderr  # found / skipped / curated / without text
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["models"]["captioner"] == str(model_dir) and manifest["trust_remote_code"] is True
    assert manifest["mllm_generation"] == {
        "prompt": PART_AWARE_PROMPT, "temperature": 0.8, "top_p": 0.4, "top_k": 5, "max_new_tokens": 12,
        "prompt_template": "{prompt}",
    }
    (rec,) = list(iter_shard_records(tmp_path / "pairs"))
    assert all(t["source"] == "caption:mllm" for seg in rec["segments"] for t in seg["texts"])


def test_pipeline_captions_in_batches_like_one_at_a_time(tmp_path):
    from use_search.curation.pipeline import CurationConfig, run_curation

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(IMAGES):
        Image.fromarray(np.asarray(Image.fromarray(im).resize((64, 64)))).save(photos / f"{i}.png")
    (photos / "broken.png").write_bytes(b"not a png")  # a failed read inside a batch
    records = {}
    for batch_size in (1, 2):
        out = tmp_path / f"pairs-{batch_size}"
        summary = run_curation(CurationConfig(
            images=photos, out=out, mllm="tiny", generation=GREEDY, mllm_batch_size=batch_size,
            grounding_model="tiny", sam="tiny", device="cpu", offline=True, progress=False,
        ))
        assert summary.images_curated == 3 and [os.path.basename(p) for p, _ in summary.images_failed] == ["broken.png"]
        records[batch_size] = sorted(iter_shard_records(out), key=lambda r: r["image"])
    assert sum(len(r["segments"]) for r in records[1]) > 0
    assert records[1] == records[2]


def test_a_saved_transformers_mllm_loads_from_its_folder(qwen, tmp_path):
    model, processor = qwen
    model.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    loaded = load_mllm_captioner(str(tmp_path / "qwen"), offline=True, params=GREEDY, dtype="float32")
    assert type(loaded.model).__name__ == "Qwen2VLForConditionalGeneration" and loaded.style == "chat"
    assert loaded.prompt_text() == MLLMCaptioner(model, processor, GREEDY).prompt_text()
    assert loaded.caption_images(IMAGES) == MLLMCaptioner(model, processor, GREEDY).caption_images(IMAGES)


def test_remote_code_written_for_older_transformers_is_a_clear_error(remote_code):
    import transformers

    _, tok_dir, _, legacy_dir = remote_code
    captioner = load_mllm_captioner(str(legacy_dir), processor=str(tok_dir), offline=True, trust_remote_code=True,
                                    params=GenerationParams(max_new_tokens=4), dtype="float32")
    with pytest.raises(RemoteCodeError, match=(
        f"(?s)own code .*modeling_tinycog.* failed inside generate\\(\\) under transformers {re.escape(transformers.__version__)}"
        ".*_extract_past_from_model_output.*LLaVA, Qwen2-VL"
    )):
        captioner.caption_images(IMAGES[:1])
