"""Optional LLM enrichment: spell out an item's (or a user's) deeper attributes before encoding.

Why: a sentence encoder sees "Häagen-Dazs HEAVEN strawberry light ice cream" as words; an LLM
knows it is *premium*, *health-conscious*, a *personal treat* — the attributes that, per the
MSD paper, actually explain a click. Asking an LLM to write those attributes out as text and
encoding ``text + attributes`` puts that world knowledge into the teacher vector, which the
student then distils. It runs in the refresher, off the hot path, once per item *change*.

Two back-ends behind one interface: any OpenAI-compatible chat endpoint (vLLM, llama.cpp
server, Ollama, a hosted API) over plain ``urllib``, and a local Hugging Face causal LM
(greedy, bounded new tokens). Enrichment must never stop the refresher: any error or empty
answer falls back to the plain text and is counted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from livectr.core.config import Config
from livectr.semantic_cache.teacher import resolve_device

log = logging.getLogger(__name__)

ITEM_SYSTEM = (
    "You are a merchandising analyst for a recommender system. Given an item, write its deeper "
    "attributes that drive whether a person chooses it, as short 'attribute: value' phrases separated "
    "by semicolons: brand tier (budget, mainstream, premium, luxury), health (e.g. light, low sugar, "
    "indulgent), price level, occasion (e.g. family dessert, gift, everyday snack), audience, style or "
    "mood. Infer only what is reasonable. No preamble."
)
ITEM_EXAMPLE = (
    "Item: Häagen-Dazs HEAVEN strawberry light ice cream\n"
    "Deeper attributes: brand tier: premium; health: light, lower fat and sugar; price level: high; "
    "occasion: personal treat; audience: health-conscious adults; mood: indulgent but guilt-free"
)
USER_SYSTEM = (
    "You are a recommender-system analyst. Given the items a user clicked recently (most recent "
    "first), summarise in one sentence the preferences behind them: brand tier, health orientation, "
    "price sensitivity, occasions, tastes. No preamble."
)
#: Longest enrichment kept (characters); the teacher truncates at 256 tokens anyway.
MAX_DETAIL_CHARS = 600


def item_prompt(text: str, attributes: Mapping[str, object] | None = None) -> str:
    """The user turn asking for an item's deeper attributes (one worked example first)."""
    attrs = "; ".join(f"{k}: {v}" for k, v in sorted((attributes or {}).items()))
    lines = [ITEM_EXAMPLE, "", f"Item: {text}"]
    if attrs:
        lines.append(f"Known attributes: {attrs}")
    lines.append("Deeper attributes:")
    return "\n".join(lines)


def user_prompt(texts: list[str], limit: int = 10) -> str:
    """The user turn asking for a summary of a user's recent clicks."""
    items = "\n".join(f"- {t}" for t in texts[:limit])
    return f"Recently clicked items:\n{items}\nPreferences:"


def clean_output(raw: str) -> str:
    """One line, no surrounding quotes or leftover labels, bounded length."""
    text = re.sub(r"\s+", " ", raw).strip().strip('"').strip()
    text = re.sub(r"^(deeper attributes|preferences)\s*:\s*", "", text, flags=re.IGNORECASE)
    return text[:MAX_DETAIL_CHARS].strip()


def enriched_text(text: str, detail: str) -> str:
    """What the teacher encodes: the item's own text followed by the LLM's attributes."""
    return f"{text}. {detail}" if detail else text


@dataclass
class EnrichStats:
    requests: int = 0
    succeeded: int = 0
    #: Calls that fell back to the plain text (error, timeout or empty answer).
    fallbacks: int = 0
    seconds: float = 0.0
    last_error: str = ""

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "enrich_requests": self.requests,
            "enrich_succeeded": self.succeeded,
            "enrich_fallbacks": self.fallbacks,
            "enrich_seconds": round(self.seconds, 3),
            "enrich_last_error": self.last_error,
        }


class Enricher(ABC):
    """An LLM back-end with the two prompts livectr uses; subclasses implement :meth:`complete`."""

    #: Part of the teacher version: vectors of enriched and plain text must never mix.
    tag: str

    def __init__(self, max_tokens: int = 64) -> None:
        self.max_tokens = max_tokens
        self.stats = EnrichStats()

    @abstractmethod
    def complete(self, system: str, prompt: str) -> str:
        """The model's raw answer to ``prompt`` under ``system``; may raise."""

    def _ask(self, system: str, prompt: str) -> str:
        """``complete`` with timing, cleaning and counted fallback ("" on any failure)."""
        self.stats.requests += 1
        started = time.perf_counter()
        try:
            answer = clean_output(self.complete(system, prompt))
            if not answer:
                raise ValueError("empty answer")
            self.stats.succeeded += 1
            return answer
        except Exception as exc:  # noqa: BLE001 - any back-end failure means "use the plain text"
            self.stats.fallbacks += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.debug("enrichment fell back to plain text: %s", self.stats.last_error)
            return ""
        finally:
            self.stats.seconds += time.perf_counter() - started

    def describe_item(self, text: str, attributes: Mapping[str, object] | None = None) -> str:
        """The item's deeper attributes as text, or "" when the back-end failed."""
        return self._ask(ITEM_SYSTEM, item_prompt(text, attributes))

    def enrich_item(self, text: str, attributes: Mapping[str, object] | None = None) -> str:
        """The text to encode: the item text plus its deeper attributes (the plain text on failure)."""
        return enriched_text(text, self.describe_item(text, attributes))

    def summarize_user(self, texts: list[str]) -> str:
        """One-sentence preference summary of a user's recently clicked items.

        Falls back to the clicked texts joined with "; " (still a meaningful thing to encode).
        """
        if not texts:
            return ""
        return self._ask(USER_SYSTEM, user_prompt(texts)) or "; ".join(texts[:10])


class OpenAICompatibleEnricher(Enricher):
    """``POST {url}/v1/chat/completions`` (greedy, bounded tokens) on any OpenAI-compatible server.

    ``api_key`` defaults to ``$OPENAI_API_KEY`` when set; local servers usually need none.
    """

    def __init__(
        self, url: str, model: str, api_key: str | None = None, timeout_s: float = 20.0, max_tokens: int = 64
    ) -> None:
        super().__init__(max_tokens)
        base = url.rstrip("/")
        self.endpoint = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout_s = timeout_s
        self.tag = f"openai:{model}"

    def complete(self, system: str, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "temperature": 0,
                "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code} from {self.endpoint}") from None
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"unexpected response shape: {str(payload)[:200]}") from None


class HFCausalLMEnricher(Enricher):
    """A local Hugging Face causal LM (any ``AutoModelForCausalLM`` directory), greedy decoding.

    Uses the tokenizer's chat template when it has one, a plain "System/User/Assistant" layout
    otherwise; the prompt is left-truncated so prompt + answer fit the model's context.
    """

    def __init__(self, model_path: str | Path, max_new_tokens: int = 64, device: str = "auto") -> None:
        super().__init__(max_new_tokens)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.model_path = Path(model_path)
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_path), local_files_only=True)
        # functools.wraps(nn.Module.to) in transformers types .to() as an unbound function
        self.model.to(self.device).eval()  # type: ignore[arg-type]
        self.context = int(
            getattr(self.model.config, "max_position_embeddings", 0)
            or getattr(self.model.config, "n_positions", 0)
            or 2048
        )
        self.tag = f"hf:{self.model_path.name}"

    def _render(self, system: str, prompt: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return f"System: {system}\nUser: {prompt}\nAssistant:"

    def complete(self, system: str, prompt: str) -> str:
        ids = self.tokenizer(self._render(system, prompt), return_tensors="pt")["input_ids"]
        budget = max(1, self.context - self.max_tokens)
        ids = ids[:, -budget:].to(self.device)
        eos = self.tokenizer.eos_token_id
        with self._torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=self._torch.ones_like(ids),
                max_new_tokens=self.max_tokens,
                do_sample=False,
                pad_token_id=eos,
                eos_token_id=eos,
            )
        return str(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def make_enricher(cfg: Config) -> Enricher | None:
    """The enricher selected by ``cfg.semantic.enrich`` ("" = none, "openai", "hf")."""
    sem = cfg.semantic
    if not sem.enrich:
        return None
    if sem.enrich == "openai":
        if not sem.enrich_url or not sem.enrich_model:
            raise ValueError("--enrich openai needs --enrich-url and --enrich-model")
        return OpenAICompatibleEnricher(
            sem.enrich_url, sem.enrich_model, timeout_s=sem.enrich_timeout_s, max_tokens=sem.enrich_max_tokens
        )
    if sem.enrich == "hf":
        if not sem.enrich_model or not Path(sem.enrich_model).is_dir():
            raise ValueError(
                f"--enrich hf needs --enrich-model pointing to a local model directory, not {sem.enrich_model!r}"
            )
        return HFCausalLMEnricher(sem.enrich_model, max_new_tokens=sem.enrich_max_tokens, device=sem.teacher_device)
    raise ValueError(f"unknown enrichment back-end {sem.enrich!r}: use '', 'openai' or 'hf'")
