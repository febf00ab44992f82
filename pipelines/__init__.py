from pipelines.finetune import finetune
from pipelines.inference import answer

__all__ = ["answer", "finetune"]
