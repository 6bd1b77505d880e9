"""Tiny, offline LLM checkpoints for tests (reusable by every LLM test file).

* :func:`make_tokenizer` — a byte-level BPE tokenizer trained in a few milliseconds on a
  small math corpus with the `tokenizers` library, saved as a
  ``PreTrainedTokenizerFast`` with Qwen-style special tokens (``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>`` as
  EOS, ``<extra_0>``) and a ChatML chat template. Text round-trips; ``"\\n"`` and
  ``"\\n\\n"`` are tokens.
* :func:`make_checkpoint` — a random tiny Qwen2 / Llama / Qwen2-PRM built with
  transformers (torch), saved with ``save_pretrained`` (safetensors) next to the
  tokenizer; returns the directory. :func:`load_torch` reloads the torch reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CORPUS = [
    "Let x be the number of apples. Then 3x + 5 = 20, so x = 5.\n\n",
    "Step 1: Compute the sum of 12 and 30, which is 42.\n\n",
    "Step 2: Divide by 6 to get 7.\n\nThe answer is \\boxed{7}.",
    "We have a = 2 and b = 3, hence a * b = 6.\n",
    "Therefore, the final answer is \\boxed{6}.\n\n",
    "Solve for y: 2y - 4 = 10. Adding 4 gives 2y = 14, so y = 7.\n\n",
    "The area of a circle of radius r is pi r^2.\nThe circumference is 2 pi r.\n\n",
    "def add(a, b):\n    return a + b\n\n",
    "Question: what is 7 times 8?\nAnswer: 56\n\n",
] * 4

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def make_tokenizer(path: str | Path, vocab_size: int = 384) -> Any:
    """Train and save a tiny byte-level BPE tokenizer; return it (transformers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<extra_0>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def _randomize(model: Any, seed: int, scale: float = 0.15) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(scale * noise)


def make_checkpoint(
    path: str | Path,
    *,
    family: str = "qwen2",
    tie_word_embeddings: bool = False,
    rope_scaling: bool = False,
    prm: bool = False,
    seed: int = 0,
    extra_vocab: int = 16,
    **overrides: Any,
) -> Path:
    """Save a random tiny checkpoint (+ tokenizer) to ``path`` and return it.

    Parameters
    ----------
    family : {"qwen2", "llama"}
    tie_word_embeddings : bool
    rope_scaling : bool
        Llama-3 rope scaling (llama only).
    prm : bool
        A ``Qwen2ForProcessRewardModel`` (Qwen2 backbone + score head).
    extra_vocab : int
        Model vocabulary = tokenizer size + ``extra_vocab`` (like Qwen's padded vocab).
    """
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    kw = dict(TINY)
    kw.update(
        vocab_size=len(tok) + extra_vocab,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        pad_token_id=tok.pad_token_id,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(rope_theta=10000.0, **kw)
    elif family == "llama":
        if rope_scaling:
            kw["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        cfg = transformers.LlamaConfig(rope_theta=50000.0, **kw)
    else:
        raise ValueError(family)
    if prm:
        model = ProcessRewardTorch(cfg)
    else:
        cls = (
            transformers.Qwen2ForCausalLM
            if family == "qwen2"
            else transformers.LlamaForCausalLM
        )
        model = cls(cfg)
    _randomize(model, seed)
    if tie_word_embeddings and not prm:
        model.tie_weights()
    model.eval()
    if prm:
        from safetensors.torch import save_file

        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        d = cfg.to_dict()
        d["architectures"] = ["Qwen2ForProcessRewardModel"]
        (path / "config.json").write_text(json.dumps(d, indent=1))
    else:
        model.save_pretrained(str(path))
    return path


def _prm_class():
    import torch
    import transformers

    class _PRM(torch.nn.Module):
        """Torch reference of Qwen2ForProcessRewardModel: Qwen2Model + score MLP."""

        def __init__(self, cfg):
            super().__init__()
            h = cfg.hidden_size
            self.config = cfg
            self.model = transformers.Qwen2Model(cfg)
            self.score = torch.nn.Sequential(
                torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2)
            )

        def forward(self, input_ids):
            h = self.model(input_ids=input_ids).last_hidden_state
            return self.score(h)

    return _PRM


def ProcessRewardTorch(cfg):
    return _prm_class()(cfg)


def load_torch(path: str | Path, *, prm: bool = False) -> Any:
    """Reload the torch reference of a checkpoint made by :func:`make_checkpoint`."""
    import torch
    import transformers

    path = Path(path)
    if prm:
        from safetensors.torch import load_file

        d = json.loads((path / "config.json").read_text())
        cfg = transformers.Qwen2Config(
            **{k: v for k, v in d.items() if k != "architectures"}
        )
        model = ProcessRewardTorch(cfg)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), torch_dtype=torch.float32
        )
    return model.eval()


def random_ids(
    rng: np.random.Generator, shape: tuple[int, ...], vocab: int
) -> np.ndarray:
    """Random token ids avoiding the special tokens at the start of the vocabulary."""
    return rng.integers(len(SPECIAL), vocab, size=shape).astype(np.int32)
