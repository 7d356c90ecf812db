"""Tiny randomly initialised models, built here from configs, for running the ``hf``
code paths offline on a CPU (tests, ``--profile tiny``). Outputs are meaningless;
everything else (processors, tokenizers, batching, parsing, saving and loading with
``from_pretrained``) is the real thing.

The models are built once, with fixed seeds, into ``$OPENSUBJECT_TINY_CACHE`` (default
``~/.cache/opensubject/tiny-models``), and the ``tiny`` backends are the ``hf`` classes
pointed at those directories. Tokenizers use a byte-level vocabulary (256 byte
symbols plus the model's special tokens, no merges), so nothing is downloaded.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from opensubject_tasks.backends.registry import register

# Bump when a tiny model's config changes, so stale caches are rebuilt.
TINY_VERSION = "3"
PARTS = ("vlm", "detector", "grounding_dino", "segmenter", "inpainter", "clip",
         "aesthetic_head.safetensors", "florence", "dinov2", "lcm_inpainter")
SEED = 1234


def cache_root() -> Path:
    root = os.environ.get("OPENSUBJECT_TINY_CACHE") or "~/.cache/opensubject/tiny-models"
    return Path(root).expanduser() / f"v{TINY_VERSION}"


def _byte_symbols() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


# A minimal Qwen-style chat template: system/user/assistant turns, images as
# <|vision_start|><|image_pad|><|vision_end|> where they appear in a message.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}\n{{ message['content'] }}"
    "{%- else %}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)


def build_vlm(out: Path) -> None:
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    ids = {s: len(vocab) + i for i, s in enumerate(specials)}
    vocab.update(ids)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",  # noqa: S106
                         pad_token="<|endoftext|>")  # noqa: S106 - token names, not secrets
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.model_max_length = 8192
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 8192, "tie_word_embeddings": True,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # 28 px per merged token: images of up to 112x112 give at most 16 image tokens.
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14,
                             merge_size=2, temporal_patch_size=2).save_pretrained(out)


def _clip_tokenizer(max_length: int) -> Any:
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    # CLIP's BPE marks the last symbol of a word with "</w>": both forms are needed.
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length), len(vocab)


def _clip_text(vocab_size: int, max_length: int) -> dict[str, Any]:
    return {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": max_length,
            "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}


def build_detector(out: Path) -> None:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    tok, vocab_size = _clip_tokenizer(16)
    config = Owlv2Config(
        text_config=_clip_text(vocab_size, 16),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        projection_dim=32,
    )
    model = Owlv2ForObjectDetection(config).eval()
    # Random box-head weights saturate the box sigmoid into zero-size boxes; small ones
    # leave each patch's prior box (its grid cell), so the tiny detector yields real boxes.
    with torch.no_grad():
        model.box_head.dense2.weight.mul_(0.01)
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(out)
    image_processor = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)


def build_grounding_dino(out: Path) -> None:
    """The other detector family (not used by the tiny profile; tests run it directly)."""
    import string

    from transformers import (
        BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessorPil,
        GroundingDinoProcessor, SwinConfig,
    )

    out.mkdir(parents=True, exist_ok=True)
    # A character-level WordPiece vocabulary (letters, digits, punctuation).
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces,
             *("##" + c for c in string.ascii_lowercase + string.digits)]
    (out / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizer(str(out / "vocab.txt"), model_max_length=64)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4,
                                   image_size=64, out_features=["stage1", "stage2"]),
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
        num_feature_levels=2, encoder_n_points=2, decoder_n_points=2, max_text_len=64,
    )
    GroundingDinoForObjectDetection(config).eval().save_pretrained(out)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)


def build_segmenter(out: Path) -> None:
    from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

    config = SamConfig(
        vision_config={"hidden_size": 32, "output_channels": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 64, "patch_size": 16,
                       "window_size": 2, "global_attn_indexes": [0], "num_pos_feats": 8,
                       "mlp_dim": 64},
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 16,
                               "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 16, "mlp_dim": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "iou_head_hidden_dim": 16},
    )
    SamModel(config).eval().save_pretrained(out)
    image_processor = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                           mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    SamProcessor(image_processor=image_processor).save_pretrained(out)


def build_clip(out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tok, vocab_size = _clip_tokenizer(77)
    config = CLIPConfig(
        text_config=_clip_text(vocab_size, 77),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)


def build_aesthetic_head(out: Path) -> None:
    """A two-layer head over the tiny CLIP's 16-d embedding, LAION-style key names."""
    from safetensors.torch import save_file

    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.0), torch.nn.Linear(8, 1))
    save_file({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(out))


def build_inpainter(out: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, vocab_size = _clip_tokenizer(77)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=9, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text(vocab_size, 77)))
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)


# -- the small profile's model classes (Florence-2, DINOv2, a latent-consistency UNet)

FLORENCE_POST_PROCESSING = ("ocr", "phrase_grounding", "pure_text", "description_with_bboxes",
                            "description_with_polygons", "polygons", "bboxes",
                            "description_with_bboxes_or_polygons")


def build_florence(out: Path) -> None:
    """Florence-2: a DaViT vision tower and a BART encoder-decoder, with the byte-level
    BART tokenizer carrying Florence's <image>, <loc_0..999> and region tokens."""
    from transformers import (
        BartTokenizer, CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    vocab = {s: i for i, s in enumerate(("<s>", "<pad>", "</s>", "<unk>"))}
    for sym in _byte_symbols():
        vocab.setdefault(sym, len(vocab))
    vocab["<mask>"] = len(vocab)
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
             "mask_token": "<mask>"}  # token names, not secrets
    tok = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"}, **names)
    tok.add_special_tokens({"additional_special_tokens": [f"<loc_{i}>" for i in range(1000)]
                            + ["<od>", "</od>", "<poly>", "</poly>", "<sep>"]})
    tok.model_max_length = 1024
    config = Florence2Config(
        vision_config={"depths": [1, 1, 1, 1], "embed_dim": [8, 16, 16, 32], "num_heads": [1, 1, 1, 2],
                       "num_groups": [1, 1, 1, 2], "window_size": 2, "projection_dim": 32,
                       "max_position_embeddings": 8, "max_temporal_embeddings": 4, "drop_path_rate": 0.0},
        text_config={"model_type": "bart", "vocab_size": len(tok), "d_model": 32, "encoder_layers": 1,
                     "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                     "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 1024,
                     "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
                     "forced_bos_token_id": 0, "forced_eos_token_id": 2},
        image_token_id=tok.image_token_id)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(out)
    # 64 px through strides 4, 2, 2, 2: 2x2 features plus the pooled one = 5 image tokens
    image_processor = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False,
                                            crop_size={"height": 64, "width": 64}, image_seq_length=5)
    Florence2Processor(image_processor=image_processor, tokenizer=tok,
                       post_processor_config={k: {} for k in FLORENCE_POST_PROCESSING}).save_pretrained(out)


def build_dinov2(out: Path) -> None:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).eval().save_pretrained(out)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)


def build_lcm_inpainter(out: Path) -> None:
    """A latent-consistency text-to-image pipeline (4-channel UNet with a guidance
    embedding, LCMScheduler), stored as LCM_Dreamshaper_v7 is; the small profile runs
    it through StableDiffusionInpaintPipeline (mask blending in latent space)."""
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, vocab_size = _clip_tokenizer(77)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, time_cond_proj_dim=32,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    LatentConsistencyModelPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**_clip_text(vocab_size, 77))), tokenizer=tok,
        unet=unet, scheduler=LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(out)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "vlm": build_vlm, "detector": build_detector, "grounding_dino": build_grounding_dino,
    "segmenter": build_segmenter,
    "inpainter": build_inpainter, "clip": build_clip,
    "aesthetic_head.safetensors": build_aesthetic_head,
    "florence": build_florence, "dinov2": build_dinov2, "lcm_inpainter": build_lcm_inpainter,
}


def ensure_tiny_models(root: Path | None = None) -> dict[str, Path]:
    """Build every tiny model once (a few seconds) and return their paths by part.

    A file lock keeps concurrent workers from building together; the models are built
    in a temporary directory and moved into place, so a crash leaves no half model."""
    root = Path(root) if root else cache_root()
    paths = {part: root / part for part in PARTS}
    if (root / "COMPLETE").exists():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "COMPLETE").exists():
            with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
                from transformers.utils import logging as hf_logging

                bars = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
                try:
                    with torch.random.fork_rng(devices=[]):
                        for part, build in BUILDERS.items():
                            torch.manual_seed(SEED)  # the same weights on every machine
                            build(Path(tmp) / part)
                finally:
                    if bars:
                        hf_logging.enable_progress_bar()
                for part in PARTS:
                    if paths[part].exists():
                        shutil.rmtree(paths[part]) if paths[part].is_dir() else paths[part].unlink()
                    os.replace(Path(tmp) / part, paths[part])
            (root / "COMPLETE").write_text(TINY_VERSION)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return paths


# Settings for the tiny models; configured options win, except the model location.
TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "vlm": {"max_new_tokens": 16, "long_caption_tokens": 16, "max_image_side": 112},
    "detector": {"threshold": 0.05},
    "segmenter": {},
    "inpainter": {"steps": 2, "resolution": 64, "guidance_scale": 1.0, "strength": 1.0},
    "embedder": {},
    "quality": {"score_range": (-1.0, 1.0)},
}


def _tiny(interface: str, cls: Callable[..., Any], options: dict[str, Any]) -> Any:
    # Layers 32 wide gain nothing from intra-op threads, and on a busy CPU their spin
    # waits make each call ten times slower (measured: 0.25 s against 4-6 s per call).
    torch.set_num_threads(1)
    paths = ensure_tiny_models()
    opts = {**TINY_DEFAULTS[interface], **options, "name": f"tiny:{interface}"}
    part = {"embedder": "clip", "quality": "clip"}.get(interface, interface)
    opts["model"] = str(paths[part])
    if interface == "quality":
        opts["head"] = str(paths["aesthetic_head.safetensors"])
    return cls(**opts)


@register("vlm", "tiny")
def make_tiny_vlm(**options: Any) -> Any:
    from opensubject_tasks.backends.hf.vlm import HFVLM

    return _tiny("vlm", HFVLM, options)


@register("detector", "tiny")
def make_tiny_detector(**options: Any) -> Any:
    from opensubject_tasks.backends.hf.detector import HFDetector

    return _tiny("detector", HFDetector, options)


@register("segmenter", "tiny")
def make_tiny_segmenter(**options: Any) -> Any:
    from opensubject_tasks.backends.hf.segmenter import HFSegmenter

    return _tiny("segmenter", HFSegmenter, options)


@register("inpainter", "tiny")
def make_tiny_inpainter(**options: Any) -> Any:
    from opensubject_tasks.backends.hf.inpainter import HFInpainter

    return _tiny("inpainter", HFInpainter, options)


@register("embedder", "tiny")
def make_tiny_embedder(**options: Any) -> Any:
    from opensubject_tasks.backends.hf.embedder import HFEmbedder

    return _tiny("embedder", HFEmbedder, options)


@register("quality", "tiny")
def make_tiny_quality(**options: Any) -> Any:
    from opensubject_tasks.backends.hf.embedder import HFAestheticScorer

    return _tiny("quality", HFAestheticScorer, options)
