"""Enrichment with a real (tiny, randomly initialised) Hugging Face causal LM built in the test.

Nothing is downloaded: the tokenizer is trained here with ``tokenizers`` and saved as a
``PreTrainedTokenizerFast``, the model is a 2-layer GPT-2 from a config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from livectr.core.config import Config
from livectr.semantic_cache.enrich import ITEM_EXAMPLE, HFCausalLMEnricher, make_enricher

CORPUS = [
    ITEM_EXAMPLE,
    "brand tier premium budget luxury; health light indulgent; occasion gift snack",
    "price level high low; audience families adults; strawberry vanilla chocolate ice cream",
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    path = tmp_path_factory.mktemp("tiny-gpt2")
    fast.save_pretrained(path)
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_hf_enricher_generates_bounded_greedy_text(tiny_lm: Path) -> None:
    enricher = HFCausalLMEnricher(tiny_lm, max_new_tokens=8, device="cpu")
    assert enricher.tag == f"hf:{tiny_lm.name}"
    detail = enricher.describe_item("Häagen-Dazs strawberry light ice cream", {"price": 5})
    if detail:  # a random model may emit only the end token: that is a counted fallback
        longest = max(len(enricher.tokenizer.decode([i])) for i in range(len(enricher.tokenizer)))
        assert len(detail) <= 8 * longest, "at most max_new_tokens tokens are generated"
        assert detail == enricher.describe_item("Häagen-Dazs strawberry light ice cream", {"price": 5}), "greedy"
    assert enricher.stats.requests >= 1
    assert enricher.stats.succeeded + enricher.stats.fallbacks == enricher.stats.requests
    summary = enricher.summarize_user(["strawberry ice cream", "vanilla tub"])
    assert summary, "a user summary is never empty (falls back to the clicked texts)"


def test_hf_enricher_truncates_long_prompts(tiny_lm: Path) -> None:
    """The prompt alone exceeds the 128-position context: it is left-truncated, not an error."""
    enricher = HFCausalLMEnricher(tiny_lm, max_new_tokens=4, device="cpu")
    enricher.describe_item("ice cream " * 400)
    assert enricher.stats.last_error == "" or "empty answer" in enricher.stats.last_error


def test_hf_enricher_failure_falls_back(tiny_lm: Path) -> None:
    enricher = HFCausalLMEnricher(tiny_lm, max_new_tokens=4, device="cpu")
    enricher.max_tokens = 10_000  # more new tokens than positions: generate raises inside
    assert enricher.enrich_item("plain text") == "plain text"
    assert enricher.stats.fallbacks == 1


def test_make_enricher_builds_hf_backend(tiny_lm: Path) -> None:
    cfg = Config()
    cfg.semantic.enrich, cfg.semantic.enrich_model, cfg.semantic.teacher_device = "hf", str(tiny_lm), "cpu"
    cfg.semantic.enrich_max_tokens = 3
    enricher = make_enricher(cfg)
    assert isinstance(enricher, HFCausalLMEnricher) and enricher.max_tokens == 3
