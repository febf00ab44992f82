"""Base vs tuned on the held-out rows: the evaluate step's library function."""

from __future__ import annotations

import math
from typing import Optional

from lorapipe.data.dataset import ConversationDataset
from lorapipe.evaluation.metrics import EvalMetrics, ModelScores, generate_scores, masked_loss
from lorapipe.hardware.plan import PhasePlan


def evaluate_adapter(adapter_dir: str, test: ConversationDataset, phase: PhasePlan, max_samples: int,
                     generation_samples: int, max_new_tokens: int, max_length: int,
                     chat_template: Optional[str] = None) -> EvalMetrics:
    """Score the base and base+adapter on the same test rows with transformers, on the evaluate phase's device, dtype
    and batch size; the backend that trained the adapter provides the two models (a PEFT adapter toggled off and on,
    an mlx-lm adapter fused)."""
    from lorapipe.backends import get_backend
    from lorapipe.backends.base import backend_of
    from lorapipe.models.loading import load_tokenizer
    from lorapipe.training.monitoring import PhaseMemory

    scored = test.records[:max_samples]
    gen = test.records[:generation_samples]
    if not scored:
        raise ValueError("the test split is empty: raise split.test_fraction or add data")
    tokenizer = load_tokenizer(adapter_dir, chat_template=chat_template)
    results = {}
    samples: list[dict] = []
    tokens = 0
    with PhaseMemory(phase.device) as memory:
        models = get_backend(backend_of(adapter_dir)).eval_models(adapter_dir, phase)
        for label, enter in models.items():
            with enter() as model:
                loss, tokens = masked_loss(model, tokenizer, scored, max_length, phase.batch_size)
                gscores, gen_samples = generate_scores(model, tokenizer, gen, max_new_tokens) if gen else ({}, [])
            if label == "tuned":
                samples = gen_samples
            results[label] = ModelScores(loss=loss, perplexity=math.exp(min(loss, 50.0)), **gscores)
    gain = (results["base"].perplexity - results["tuned"].perplexity) / results["base"].perplexity
    return EvalMetrics(test_rows=len(test), scored_rows=len(scored), generated_rows=len(samples), scored_tokens=tokens,
                       base=results["base"], tuned=results["tuned"], perplexity_gain=gain,
                       tuned_beats_base=results["tuned"].perplexity < results["base"].perplexity, samples=samples,
                       memory_gb=memory.gb)
