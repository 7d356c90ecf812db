"""Vision-language model through transformers (default: Qwen2.5-VL-7B-Instruct).

Every question is one chat turn with its images; turns are batched (left padding)
and decoded greedily, so the same inputs give the same replies. Replies are parsed
strictly: what cannot be parsed is reported as such (``CategoryList.error``,
``YesNo.answer is None``) with the raw reply kept, never guessed.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from opensubject_tasks.backends.base import Caption, CategoryList, Image, YesNo
from opensubject_tasks.backends.categories import normalise_category, screen_categories
from opensubject_tasks.backends.hf.common import HFBackend, fit_within, move, to_pil
from opensubject_tasks.backends.prompts import prompt_text, prompts_version
from opensubject_tasks.backends.registry import register

DEFAULT_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"

_YES = {"yes", "true"}
_NO = {"no", "false"}


def _json_candidates(text: str, prefix: str) -> list[str]:
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    out = [text]
    if text.startswith(prefix.strip()):
        out += [text + "]}", text + '"]}']      # a reply cut off by the token limit
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        out.append(text[start:end + 1])
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        out.append(text[start:end + 1])
    return out


def parse_categories(raw: str, vocabulary: Sequence[str] | None = None, max_categories: int = 8,
                     prefix: str = "") -> CategoryList:
    """Parse a category-listing reply. ``error`` is set, with the reason, when the reply
    is not the asked-for JSON list; entries that are not subject nouns (or not in
    ``vocabulary``) are refused one by one into ``rejected`` and the valid ones kept.
    Names come back in their normal form (lowercase, singular, no adjectives)."""
    text = (raw or "").strip()
    if not text or text == prefix.strip():
        return CategoryList([], raw=raw, error="empty reply")
    data: Any = None
    for cand in _json_candidates(text, prefix):
        try:
            data = json.loads(cand)
            break
        except ValueError:
            continue
    else:
        return CategoryList([], raw=raw, error=f"reply is not JSON: {text[:80]!r}")
    items = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(items, list):
        return CategoryList([], raw=raw, error="JSON reply holds no 'categories' list")
    allowed = frozenset(normalise_category(v) for v in vocabulary) if vocabulary else None
    valid, rejected = screen_categories(items, allowed, max_categories)
    return CategoryList(valid, raw=raw, rejected=rejected)


def parse_yes_no(reply: str) -> bool | None:
    words = re.findall(r"[a-z]+", (reply or "").lower())
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    return None


def _image_only_processor(path: Any) -> Any:
    """The model's processor without its video slot. Qwen2-VL-class processors need
    torchvision for their video processor even when no video is given; with the image
    processor and tokenizer alone they process images exactly the same."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    full = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type, "") or "", None)
    if full is None:
        raise RuntimeError(f"no processor class known for model type {model_type!r}")

    class ImageOnly(full):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: ANN001
            super().__init__(image_processor=image_processor, tokenizer=tokenizer,
                             video_processor=None, chat_template=chat_template, **kwargs)

    return ImageOnly(image_processor=image_processor, tokenizer=tokenizer,
                     chat_template=_chat_template(path, tokenizer))


def _chat_template(path: Any, tokenizer: Any) -> str | None:
    """Hub repos keep the template beside the tokenizer or in the processor's files."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


class HFVLM(HFBackend):
    interface = "vlm"
    default_model = DEFAULT_VLM

    def __init__(self, model: str = DEFAULT_VLM, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 8, max_new_tokens: int = 96, long_caption_tokens: int = 256,
                 max_image_side: int = 768, max_categories: int = 8,
                 vocabulary: Sequence[str] | None = None, name: str | None = None) -> None:
        super().__init__(model, device, dtype, batch_size, name)
        self.prompts_version = prompts_version()
        self.name = f"{self.name}+prompts@{self.prompts_version}"
        self.max_new_tokens = max_new_tokens
        self.long_caption_tokens = long_caption_tokens
        self.max_image_side = max_image_side
        self.max_categories = max_categories
        self.vocabulary = list(vocabulary) if vocabulary else None
        try:
            self.processor = self.load(AutoProcessor.from_pretrained)
        except ImportError:  # a video processor that needs torchvision
            self.processor = _image_only_processor(self.path)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues at the right edge
        self.model = self.load(AutoModelForImageTextToText.from_pretrained, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.yes_ids = self._first_token_ids(("yes", "Yes", "YES", " yes", " Yes"))
        self.no_ids = self._first_token_ids(("no", "No", "NO", " no", " No")) - self.yes_ids
        self.yes_ids -= self.no_ids

    def _first_token_ids(self, words: Sequence[str]) -> set[int]:
        ids = set()
        for w in words:
            tokens = self.tokenizer.encode(w, add_special_tokens=False)
            if tokens:
                ids.add(tokens[0])
        return ids

    # -- one batched generate over (images, prompt) turns
    def _generate(self, turns: list[tuple[Sequence[Image], str]], max_new_tokens: int,
                  reply_prefix: str = "", want_first_logits: bool = False, system: bool = True,
                  text_first: bool = False) -> list[tuple[str, torch.Tensor | None]]:
        texts, images = [], []
        for imgs, prompt in turns:
            content: list[dict[str, Any]] = [{"type": "image"} for _ in imgs]
            text = {"type": "text", "text": prompt}
            content = [text, *content] if text_first else [*content, text]
            messages = [{"role": "user", "content": content}]
            if system:
                messages.insert(0, {"role": "system", "content": [{"type": "text", "text": prompt_text("system")}]})
            texts.append(self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False) + reply_prefix)
            images.extend(self.vlm_image(im) for im in imgs)
        inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        inputs = move(dict(inputs), self.device, self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                return_dict_in_generate=True, output_logits=want_first_logits,
                pad_token_id=self.tokenizer.pad_token_id)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        replies = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        first = out.logits[0].float().cpu() if want_first_logits else None
        return [(r, first[i] if first is not None else None) for i, r in enumerate(replies)]

    def vlm_image(self, image: Image) -> PILImage.Image:
        """The image as the model sees it: at most ``max_image_side``, padded on the right
        and bottom (coordinates unchanged) to at least MIN_SIDE px and an aspect ratio of at
        most MAX_ASPECT: Qwen's smart_resize refuses ratios above 200 and a 1-px side."""
        return pad_extreme(fit_within(to_pil(image), self.max_image_side))

    def vlm_scale(self, image: Image) -> float:
        """Factor from the image's pixels to the pixels the model sees."""
        h, w = np.asarray(image).shape[:2]
        side = max(h, w)
        return self.max_image_side / side if self.max_image_side and side > self.max_image_side else 1.0

    def _run(self, turns: list[tuple[Sequence[Image], str]], **kw: Any) -> list[tuple[str, Any]]:
        return self.batcher.map(lambda chunk: self._generate(chunk, **kw), turns)

    # -- the VLM interface
    def list_categories(self, images: Sequence[Image]) -> list[CategoryList]:
        prefix = prompt_text("list_categories", "reply_prefix")
        turns = [([im], prompt_text("list_categories")) for im in images]
        replies = self._run(turns, max_new_tokens=self.max_new_tokens, reply_prefix=prefix)
        return [parse_categories(prefix + reply, self.vocabulary, self.max_categories, prefix)
                for reply, _ in replies]

    def p_yes(self, logits: torch.Tensor) -> float | None:
        """P(yes) against P(no) from the first reply token's logits."""
        if not self.yes_ids or not self.no_ids:
            return None
        lse_yes = torch.logsumexp(logits[sorted(self.yes_ids)], 0)
        lse_no = torch.logsumexp(logits[sorted(self.no_ids)], 0)
        return float(torch.sigmoid(lse_yes - lse_no))

    def ask_yes_no(self, images: Sequence[Sequence[Image]], questions: Sequence[str]) -> list[YesNo]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} image lists for {len(questions)} questions")
        suffix = prompt_text("yes_no", "suffix")
        turns = [(list(imgs), q if "yes or no" in q.lower() else f"{q}\n{suffix}")
                 for imgs, q in zip(images, questions, strict=True)]
        replies = self._run(turns, max_new_tokens=4, want_first_logits=True)
        return [YesNo(parse_yes_no(reply), self.p_yes(logits), raw=reply) for reply, logits in replies]

    def answer(self, images: Sequence[Sequence[Image]], prompts: Sequence[str], *,
               max_new_tokens: int | None = None, system: bool = True, text_first: bool = False) -> list[str]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        turns = [(list(imgs), prompt_text("answer", prompt=p)) for imgs, p in zip(images, prompts, strict=True)]
        return [r.strip() for r, _ in self._run(turns, max_new_tokens=max_new_tokens or self.long_caption_tokens,
                                                 system=system, text_first=text_first)]

    def caption(self, images: Sequence[Image], hints: Sequence[dict[str, Any]]) -> list[Caption]:
        if len(images) != len(hints):
            raise ValueError(f"{len(images)} images for {len(hints)} hints")

        # boxes in the hints are in the image's pixels: in the model's pixels here
        hints = [scale_hint_box(h, self.vlm_scale(im)) for im, h in zip(images, hints, strict=True)]

        def turns(key: str) -> list[tuple[list[Image], str]]:
            return [([im], prompt_text(key, hints=_hint_text(h))) for im, h in zip(images, hints, strict=True)]

        short = self._run(turns("caption_short"), max_new_tokens=self.max_new_tokens)
        long = self._run(turns("caption_long"), max_new_tokens=self.long_caption_tokens)
        return [Caption(short=" ".join(s.split()), long=" ".join(lg.split()), source=self.name)
                for (s, _), (lg, _) in zip(short, long, strict=True)]


MIN_SIDE = 28        # Qwen2-VL's patch (14) x merge (2): one token's worth of pixels
MAX_ASPECT = 50.0    # well inside smart_resize's 200


def pad_extreme(image: PILImage.Image) -> PILImage.Image:
    """Pad a sliver (a 1x300 crop) with grey on the right and bottom to at least MIN_SIDE
    px and at most MAX_ASPECT:1, so it never fails a batch; other images as they are."""
    w, h = image.size
    nw, nh = max(w, MIN_SIDE), max(h, MIN_SIDE)
    nw, nh = max(nw, int(np.ceil(nh / MAX_ASPECT))), max(nh, int(np.ceil(nw / MAX_ASPECT)))
    if (nw, nh) == (w, h):
        return image
    out = PILImage.new("RGB", (nw, nh), (128, 128, 128))
    out.paste(image.convert("RGB"), (0, 0))
    return out


def scale_hint_box(hint: dict[str, Any], scale: float) -> dict[str, Any]:
    """A caption hint whose ``box`` is given in the pixels the model sees."""
    box = (hint or {}).get("box")
    if not box or scale == 1.0:
        return hint
    return {**hint, "box": [int(round(float(v) * scale)) for v in box]}


def _hint_text(hints: dict[str, Any]) -> str:
    facts = "; ".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                      for k, v in (hints or {}).items() if v not in (None, "", [], ()))
    return prompt_text("hints", facts=facts) if facts else ""


@register("vlm", "hf")
def make_hf_vlm(**options: Any) -> HFVLM:
    return HFVLM(**options)


__all__ = ["DEFAULT_VLM", "HFVLM", "parse_categories", "parse_yes_no"]
