"""Model facts for the planner tests, from real public config.json values (tests/data/model_configs, no weights)
and from the tiny model's shape: the facts the plan reads, built the way `lorapipe.hardware.memory` builds them."""

from pathlib import Path

from lorapipe.hardware.facts import ModelFacts, facts_from_config

CONFIGS = Path(__file__).parent / "data" / "model_configs"


def facts(name: str) -> ModelFacts:
    """Facts of a public model from its config.json (e.g. "llama-3.1-8b")."""
    from transformers import AutoConfig

    return facts_from_config(AutoConfig.from_pretrained(str(CONFIGS / f"{name}.json")), source=name)


def tiny_facts() -> ModelFacts:
    """The tiny model's shape (lorapipe.models.tiny "tiny": hidden 64, 2 layers, vocabulary ~1024)."""
    from transformers import LlamaConfig

    return facts_from_config(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2), source="tiny")


def autograd_saved_bytes(model, forward) -> int:
    """Bytes of the tensors autograd saves for the backward pass while `forward()` runs, the model's own parameters
    not counted (each storage once): what the memory model's activation terms predict."""
    import torch

    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())
